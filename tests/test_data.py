"""train/data.py: procedural landscapes, the image folder, index-based sources (no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fewstep.train import data
from fewstep.train.data import (
    LANDSCAPE_CLASSES,
    DataError,
    FolderSource,
    ImageFolder,
    ImageSource,
    Landscapes,
    open_source,
    render_landscape,
    to_model_range,
)

K = len(LANDSCAPE_CLASSES)


def renders(kind: str, count: int, size: int = 32, seed: int = 11) -> list[np.ndarray]:
    label = LANDSCAPE_CLASSES.index(kind)
    return [render_landscape(seed, label + K * j, size)[0] for j in range(count)]


# ------------------------------------------------------------------ landscapes


def test_same_seed_and_index_give_identical_bytes() -> None:
    for index in (0, 1, 5, 12345):
        a, la = render_landscape(3, index, 32)
        b, lb = render_landscape(3, index, 32)
        assert la == lb and a.tobytes() == b.tobytes()


def test_other_index_or_seed_gives_another_image() -> None:
    base = render_landscape(3, 7, 32)[0]
    assert not np.array_equal(base, render_landscape(3, 7 + K, 32)[0])  # same class, next scene
    assert not np.array_equal(base, render_landscape(4, 7, 32)[0])


def test_labels_cycle_so_consecutive_indices_are_balanced() -> None:
    labels = [render_landscape(0, i, 16)[1] for i in range(5, 5 + 6 * K)]
    assert labels == [i % K for i in range(5, 5 + 6 * K)]
    assert np.bincount(labels, minlength=K).tolist() == [6] * K


@pytest.mark.parametrize("size", [16, 32, 64])
@pytest.mark.parametrize("kind", LANDSCAPE_CLASSES)
def test_every_class_renders_at_every_size(kind: str, size: int) -> None:
    label = LANDSCAPE_CLASSES.index(kind)
    img, got = render_landscape(1, label, size)
    assert got == label
    assert img.shape == (size, size, 3) and img.dtype == np.uint8 and img.flags.c_contiguous
    assert img.std() > 8  # a picture, not a flat colour
    assert 15 < img.mean() < 235
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 20


def test_label_argument_overrides_the_class() -> None:
    img, label = render_landscape(0, 0, 32, label=LANDSCAPE_CLASSES.index("night"))
    assert label == LANDSCAPE_CLASSES.index("night")
    assert img[:16].mean() < 60  # dark sky although index 0 would be mountains


def test_one_scene_at_every_size() -> None:
    """The random draws do not depend on size: 64 px box-downsampled ~ the 32 px render."""
    for i in range(12):
        small = render_landscape(2, i, 32)[0].astype(float)
        big = render_landscape(2, i, 64)[0].astype(float).reshape(32, 2, 32, 2, 3).mean((1, 3))
        other = render_landscape(2, i + K, 32)[0].astype(float)
        assert np.abs(small - big).mean() < 4 < np.abs(small - other).mean()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="size=8"):
        render_landscape(0, 0, 8)
    with pytest.raises(ValueError, match="seed=-1"):
        render_landscape(-1, 0)
    with pytest.raises(ValueError, match="label=6"):
        render_landscape(0, 0, label=6)


def top_mean(imgs: list[np.ndarray]) -> np.ndarray:
    return np.mean([im[: im.shape[0] // 2].reshape(-1, 3).mean(0) for im in imgs], 0)  # RGB


def test_night_sky_is_dark_and_day_sky_blue() -> None:
    night, day = top_mean(renders("night", 12)), top_mean(renders("mountains", 12))
    assert night.mean() < 60 < 110 < day.mean()
    assert day[2] > day[0] + 40  # blue sky
    for im in renders("night", 12):
        assert im[:16].mean() < 70


def test_sunset_sky_is_warm() -> None:
    for im in renders("sunset", 12):
        r, _, b = im[:16].reshape(-1, 3).mean(0)
        assert r > b + 20
    for im in renders("mountains", 12) + renders("lake", 12):
        r, _, b = im[:16].reshape(-1, 3).mean(0)
        assert b > r + 20


@pytest.mark.parametrize("kind", ["mountains", "lake", "forest", "sunset", "night"])
def test_sun_or_moon_in_the_sky(kind: str) -> None:
    lit = [bool(((im[:16, :, 0] > 225) & (im[:16, :, 1] > 200)).any()) for im in renders(kind, 24)]
    assert np.mean(lit) > 0.8  # a few hide behind a ridge


def test_forest_tree_line_is_jagged() -> None:
    """Conifers make the forest's ridges far busier left-to-right than the lake's hills."""

    def busy(im: np.ndarray) -> float:
        return float(np.abs(np.diff(im[8:28].astype(float).mean(-1), axis=1)).mean())

    assert np.mean([busy(im) for im in renders("forest", 24)]) > 2 * np.mean(
        [busy(im) for im in renders("lake", 24)])


def white_fraction(im: np.ndarray) -> float:
    return float((im.min(-1) > 200).mean())


def green_fraction(im: np.ndarray) -> float:
    low = im[im.shape[0] // 2 :].astype(int)
    return float(((low[..., 1] > low[..., 0] + 10) & (low[..., 1] > low[..., 2] + 5)).mean())


def test_snow_is_white_and_forest_green() -> None:
    for im in renders("snow", 12):
        assert white_fraction(im) > 0.15
    for kind in ("mountains", "lake", "forest", "sunset", "night"):
        assert max(white_fraction(im) for im in renders(kind, 12)) < 0.05, kind
    for im in renders("forest", 12):
        assert green_fraction(im) > 0.5
    for kind in ("snow", "sunset", "night"):
        assert max(green_fraction(im) for im in renders(kind, 12)) < 0.05, kind


def mirror_score(im: np.ndarray) -> float:
    """Best correlation of the rows above a horizontal line with the rows mirrored below it,
    over lines in the band where a lake's water line lies (0.58..0.72 of the height)."""
    g = im.astype(float).mean(-1)
    h, best = g.shape[0], -1.0
    for axis in range(int(0.55 * h), int(0.75 * h) + 1):
        d = min(8, h - axis)
        up, down = g[axis - d : axis][::-1], g[axis : axis + d]
        up, down = up - up.mean(1, keepdims=True), down - down.mean(1, keepdims=True)
        best = max(best, (up * down).sum() / (np.sqrt((up**2).sum() * (down**2).sum()) + 1e-9))
    return best


def test_lake_mirrors_the_scene_more_than_mountains() -> None:
    lake = np.mean([mirror_score(im) for im in renders("lake", 24)])
    mountains = np.mean([mirror_score(im) for im in renders("mountains", 24)])
    assert lake > mountains + 0.2


def test_landscapes_source() -> None:
    src = Landscapes(seed=5, size=32)
    assert isinstance(src, ImageSource)
    assert (src.size, src.num_classes, src.class_names) == (32, K, LANDSCAPE_CLASSES)
    img, label = src.image(13)
    ref, ref_label = render_landscape(5, 13, 32)
    assert label == ref_label == 13 % K and np.array_equal(img, ref)
    with pytest.raises(DataError, match="size=8"):
        Landscapes(seed=0, size=8)


# ------------------------------------------------------------------ image folder


def write(path: Path, im: Image.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cats/: RGB, L, P; dogs/: RGBA (transparent), I;16, a wide image for the centre crop."""
    root = tmp_path / "pets"
    rgb = np.zeros((30, 40, 3), np.uint8)
    rgb[..., 0] = 200
    write(root / "cats" / "a.png", Image.fromarray(rgb))
    write(root / "cats" / "b.PNG", Image.fromarray(np.full((20, 20), 90, np.uint8)))  # L
    write(root / "cats" / "sub" / "c.bmp", Image.fromarray(rgb).convert("P"))
    rgba = np.zeros((24, 24, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent
    write(root / "dogs" / "d.png", Image.fromarray(rgba))
    write(root / "dogs" / "e.png", Image.fromarray(np.full((20, 30), 65535, np.uint16)))
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, 20:40, 1] = 255  # green middle third, black sides
    write(root / "dogs" / "f.jpg", Image.fromarray(wide))
    (root / "dogs" / "._d.png").write_bytes(b"macOS resource fork")  # hidden: skipped
    (root / "dogs" / "notes.txt").write_text("not an image")  # other extension: skipped
    return root


def test_folder_classes_labels_and_sizes(folder: Path) -> None:
    data = ImageFolder.scan(folder, 16)
    assert data.class_names == ("cats", "dogs") and data.num_classes == 2 and len(data) == 6
    assert [p.name for p in data.paths] == ["a.png", "b.PNG", "c.bmp", "d.png", "e.png", "f.jpg"]
    assert list(data.labels) == [0, 0, 0, 1, 1, 1]
    for i in range(len(data)):
        img, label = data.load(i)
        assert img.shape == (16, 16, 3) and img.dtype == np.uint8 and label == data.labels[i]


def test_folder_modes_become_rgb(folder: Path) -> None:
    data = ImageFolder.scan(folder, 16)
    pixel = {p.name: data.load(i)[0][8, 8].tolist() for i, p in enumerate(data.paths)}
    assert pixel["a.png"] == [200, 0, 0]
    assert pixel["b.PNG"] == [90, 90, 90]  # L
    assert pixel["c.bmp"][0] > 150  # P
    assert pixel["d.png"] == [255, 255, 255]  # RGBA: transparent over white
    assert pixel["e.png"] == [255, 255, 255]  # I;16 full scale
    crop = data.load(data.paths.index(folder / "dogs" / "f.jpg"))[0].astype(int)
    assert crop[:, :, 1].mean() > 200 and crop[:, :, 0].max() < 60  # centre third only


def test_unlabelled_folder(tmp_path: Path) -> None:
    write(tmp_path / "x.png", Image.new("RGB", (8, 8), (1, 2, 3)))
    write(tmp_path / "y.jpeg", Image.new("RGB", (8, 12), (200, 200, 200)))
    data = ImageFolder.scan(tmp_path, 8)
    assert data.num_classes == 0 and data.class_names == () and len(data) == 2
    assert data.load(0)[1] == 0 and data.load(0)[0][0, 0].tolist() == [1, 2, 3]


def test_corrupt_and_empty_files_are_reported_by_path(folder: Path) -> None:
    bad = folder / "dogs" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    empty = folder / "cats" / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(DataError) as err:
        ImageFolder.scan(folder, 16)
    msg = str(err.value)
    assert msg.startswith(f"2 unreadable images under {folder}: ")
    assert f"{bad} (" in msg and f"{empty} (empty file)" in msg and "remove or fix" in msg
    assert "Traceback" not in msg


def test_many_bad_files_are_summarised(tmp_path: Path) -> None:
    for i in range(13):
        (tmp_path / f"{i:02d}.png").write_bytes(b"nope")
    with pytest.raises(DataError, match=r"13 unreadable images .*, and 3 more; remove") as err:
        ImageFolder.scan(tmp_path, 16)
    assert str(tmp_path / "09.png") in str(err.value) and "10.png" not in str(err.value)


def test_empty_missing_and_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no images in .*\.png"):
        ImageFolder.scan(tmp_path, 16)
    (tmp_path / "cls").mkdir()
    with pytest.raises(DataError, match=r"class folder .*cls has no images"):
        ImageFolder.scan(tmp_path, 16)
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder.scan(tmp_path / "missing", 16)
    write(tmp_path / "cls" / "a.png", Image.new("RGB", (4, 4)))
    with pytest.raises(DataError, match="is not a folder"):
        ImageFolder.scan(tmp_path / "cls" / "a.png", 16)
    write(tmp_path / "loose.png", Image.new("RGB", (4, 4)))
    with pytest.raises(DataError, match="beside class folders"):
        ImageFolder.scan(tmp_path, 16)


# ------------------------------------------------------------------ folder source


@pytest.fixture
def numbered(tmp_path: Path) -> ImageFolder:
    """Five images whose red channel is their number and whose left column is marked."""
    for k in range(5):
        img = np.zeros((8, 8, 3), np.uint8)
        img[..., 0] = 10 * k
        img[:, 0, 2] = 255
        write(tmp_path / f"{k}.png", Image.fromarray(img))
    return ImageFolder.scan(tmp_path, 8)


def ident(img: np.ndarray) -> int:
    return int(img[4, 4, 0]) // 10


def test_each_epoch_shows_every_image_once(numbered: ImageFolder) -> None:
    src = FolderSource(numbered, seed=3, flip=False)
    orders = [[ident(src.image(e * 5 + j)[0]) for j in range(5)] for e in range(4)]
    for order in orders:
        assert sorted(order) == [0, 1, 2, 3, 4]
    assert all(src.image(i)[0][0, 0, 2] == 255 for i in range(20))  # flip=False: never mirrored
    assert len({tuple(o) for o in orders}) > 1  # a fresh permutation per epoch


def test_folder_source_is_deterministic_per_index(numbered: ImageFolder) -> None:
    a, b = FolderSource(numbered, seed=9), FolderSource(numbered, seed=9)
    forward = [a.image(i)[0] for i in range(20)]
    backward = [b.image(i)[0] for i in reversed(range(20))][::-1]  # resume / shard order
    assert all(np.array_equal(x, y) for x, y in zip(forward, backward, strict=True))
    flipped = [bool(im[0, -1, 2] == 255) for im in forward]
    assert 0 < sum(flipped) < 20  # some mirrored, some not
    assert all(im.flags.c_contiguous for im in forward)
    c = FolderSource(numbered, seed=10)
    assert any(not np.array_equal(c.image(i)[0], forward[i]) for i in range(20))  # seed matters


def test_open_source(numbered: ImageFolder, tmp_path: Path) -> None:
    land = open_source("landscapes", 32, seed=1)
    assert isinstance(land, Landscapes) and land.num_classes == K
    src = open_source(str(numbered.root), 8, seed=1)
    assert isinstance(src, FolderSource) and isinstance(src, ImageSource)
    assert (src.size, src.num_classes, src.class_names) == (8, 0, ())
    with pytest.raises(DataError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"), 8, seed=1)


def test_to_model_range() -> None:
    batch = np.zeros((2, 4, 5, 3), np.uint8)
    batch[0, ..., 1] = 255
    x = to_model_range(batch)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32 and x.flags.c_contiguous
    assert x[0, 1].min() == 1.0 and x[0, 0].max() == -1.0 and x[1].max() == -1.0
    mid = to_model_range(np.full((1, 1, 1, 3), 51, np.uint8))
    np.testing.assert_allclose(mid, 51 / 127.5 - 1, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(batch.astype(np.float32))


def test_module_does_not_import_torch() -> None:
    """Loaded by file path, so a torch-using train/__init__.py cannot hide an import here."""
    code = (
        "import importlib.util as u, sys\n"
        f"spec = u.spec_from_file_location('data_alone', {data.__file__!r})\n"
        "sys.modules['data_alone'] = m = u.module_from_spec(spec)\n"
        "spec.loader.exec_module(m)\n"
        "sys.exit(2 if 'torch' in sys.modules else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr or "data.py imported torch"
