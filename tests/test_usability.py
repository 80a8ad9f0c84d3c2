"""What a new user meets first: single images and one file per image, init images and masks
of any size and type, the API's default steps, progress on a terminal and in logs, help
without torch, plurals, `fewstep info`'s columns, the package's metadata and version."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx_oracle as oo
import pytest
from PIL import Image

from fewstep.runtime import cli, cli_info, cli_sample, clitools, images
from fewstep.runtime.images import to_uint8_nhwc
from fewstep.runtime.meta import ModelMeta
from fewstep.runtime.pipeline import Pipeline

SIZE = 8


@pytest.fixture(scope="module")
def meta() -> ModelMeta:
    return oo.make_meta("v_prediction", num_classes=3, size=SIZE, distilled_steps=(3,),
                        distilled_spacing="trailing")


@pytest.fixture(scope="module")
def x0(meta: ModelMeta) -> np.ndarray:
    return oo.pixel_x0(meta)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, meta: ModelMeta, x0: np.ndarray) -> Path:
    return oo.write_artifact(tmp_path_factory.mktemp("artifact"), meta, x0)


def denoiser_pipe(meta: ModelMeta, x0: np.ndarray) -> Pipeline:
    return Pipeline.from_graphs([oo.toy(meta.for_graph(kind="denoiser"), x0, 0.0)])


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------
# One clean image, one file per image
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1, 3])
def test_n_1_writes_the_image_alone_without_a_frame(
        scale: int, model: Path, x0: np.ndarray, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "one.png"
    code, stdout, err = run(["sample", "--model", str(model), "--backend", "ort-cpu", "--n",
                             "1", "--steps", "1", "--labels", "2", "--scale", str(scale),
                             "--out", str(out)], capsys)
    assert code == 0, err
    assert stdout == f"{out}\n"
    assert "1 image, 1 step (" in err and "1/1 image" in err  # no "1 images", "1 steps"
    want = to_uint8_nhwc(x0[[2]].astype(np.float32))[0]
    want = want.repeat(scale, axis=0).repeat(scale, axis=1)
    np.testing.assert_array_equal(read(out), want)  # (8*scale)^2, no white padding


def test_out_dir_writes_one_png_per_image(model: Path, x0: np.ndarray, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "made"  # made when missing
    code, stdout, err = run(["sample", "--model", str(model), "--backend", "ort-cpu", "--n",
                             "4", "--seed", "7", "--scale", "2", "--out-dir", str(folder)],
                            capsys)
    assert code == 0, err
    names = [f"7-000{i}.png" for i in range(4)]
    assert stdout.splitlines() == [str(folder / n) for n in names]
    assert sorted(p.name for p in folder.iterdir()) == names  # no temporaries left
    for i, name in enumerate(names):
        want = to_uint8_nhwc(x0[[i % 3]].astype(np.float32))[0].repeat(2, 0).repeat(2, 1)
        np.testing.assert_array_equal(read(folder / name), want)
    # One image written alone feeds back as an init image without any notice.
    code, _, err = run(["sample", "--model", str(model), "--backend", "ort-cpu", "--n", "1",
                        "--scale", "1", "--init-image", str(folder / names[0]),
                        "--out-dir", str(folder)], capsys)
    assert code == 0, err
    assert "resized" in err  # the --scale 2 file is 16x16: said, not silent
    assert "looks like a grid" not in err


def test_out_and_out_dir_are_checked_before_any_work(model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    for argv, message in (
        (["--out-dir", str(a_file)], "is a file, not a folder"),
        (["--out-dir", str(tmp_path / "no" / "such")], "does not exist"),
        (["--out", "x.png", "--out-dir", str(tmp_path)], "not allowed with argument"),
        ([], "one of the arguments --out --out-dir is required"),
    ):
        code, stdout, err = run(["sample", "--model", str(model), *argv], capsys)
        lines = err.splitlines()
        assert code == 2 and stdout == "" and len(lines) == 1, err
        assert lines[0].startswith("error: ") and message in lines[0], err
    assert not (tmp_path / "no").exists()


# ---------------------------------------------------------------------------------
# Init images and masks: any size and type, resized with a notice
# ---------------------------------------------------------------------------------


def big_pixels(h: int = 20, w: int = 12, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def expect_resized(px: np.ndarray, size: int = SIZE) -> np.ndarray:
    """Pillow's bicubic resize of uint8 pixels: what the runtime must use."""
    return np.asarray(Image.fromarray(px).resize((size, size), Image.Resampling.BICUBIC))


def generate_warned(pipe: Pipeline, **kwargs: Any) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = pipe.generate(2, 3, seed=1, **kwargs)
    return out, [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", ["path", "pil", "uint8", "float"])
def test_init_image_of_another_size_is_resized_with_one_notice(
        kind: str, meta: ModelMeta, x0: np.ndarray, tmp_path: Path) -> None:
    px = big_pixels()
    image: Any = {
        "path": tmp_path / "big.png", "pil": Image.fromarray(px), "uint8": px,
        "float": px.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0,
    }[kind]
    Image.fromarray(px).save(tmp_path / "big.png")
    keep = np.zeros((SIZE, SIZE), np.float32)
    keep[:, : SIZE // 2] = 1.0  # regenerate the left half, keep the right half
    out, notes = generate_warned(denoiser_pipe(meta, x0), init_image=image, mask=keep)
    assert len(notes) == 1 and "is 12x20, resized to the model's 8x8" in notes[0], notes
    assert "\n" not in notes[0]
    right = slice(SIZE // 2, None)
    if kind == "float":  # resized as floats: within a level of the uint8 resize
        diff = out[:, :, right].astype(int) - expect_resized(px)[:, right].astype(int)
        assert np.abs(diff).max() <= 1
    else:
        for img in out:
            np.testing.assert_array_equal(img[:, right], expect_resized(px)[:, right])


def test_init_image_types_at_the_model_size_need_no_notice(
        meta: ModelMeta, x0: np.ndarray, tmp_path: Path) -> None:
    px = big_pixels(SIZE, SIZE)
    gray = px[..., 0]
    rgba = np.dstack([px, np.full((SIZE, SIZE), 255, np.uint8)])
    keep = np.zeros((SIZE, SIZE), np.uint8)  # uint8 mask: 0 = keep everywhere
    pipe = denoiser_pipe(meta, x0)
    for image, want in ((Image.fromarray(px), px), (px, px), (rgba, px),
                        (Image.fromarray(rgba), px),
                        (gray, np.repeat(gray[..., None], 3, axis=2))):
        out, notes = generate_warned(pipe, init_image=image, mask=keep)
        assert notes == []
        for img in out:
            np.testing.assert_array_equal(img, want)


@pytest.mark.parametrize("kind", ["path", "pil", "uint8", "bool", "float"])
def test_mask_of_another_size_is_resized_with_one_notice(
        kind: str, meta: ModelMeta, x0: np.ndarray, tmp_path: Path) -> None:
    big = np.zeros((16, 24), bool)
    big[:, 12:] = True  # regenerate the right half
    as_u8 = big.astype(np.uint8) * 255
    Image.fromarray(as_u8).save(tmp_path / "mask.png")
    mask: Any = {"path": tmp_path / "mask.png", "pil": Image.fromarray(as_u8), "uint8": as_u8,
                 "bool": big, "float": big.astype(np.float32)}[kind]
    init = big_pixels(SIZE, SIZE)
    out, notes = generate_warned(denoiser_pipe(meta, x0), init_image=init, mask=mask)
    assert len(notes) == 1 and "mask" in notes[0] and "is 24x16, resized to the model's 8x8" \
        in notes[0], notes
    left, right = slice(None, SIZE // 2), slice(SIZE // 2, None)
    for i, img in enumerate(out):
        np.testing.assert_array_equal(img[:, left], init[:, left])  # kept
        np.testing.assert_array_equal(
            img[:, right], to_uint8_nhwc(x0[[i]].astype(np.float32))[0][:, right])


def test_a_grid_given_as_init_image_is_named_as_such(meta: ModelMeta, x0: np.ndarray,
                                                     tmp_path: Path) -> None:
    tiles = np.stack([big_pixels(SIZE, SIZE, seed=s) for s in range(6)])
    images.save_image(images.grid(tiles, nrow=3), tmp_path / "grid.png", scale=2)
    _, notes = generate_warned(denoiser_pipe(meta, x0), init_image=tmp_path / "grid.png",
                               strength=0.5)
    assert len(notes) == 1, notes
    assert "is 64x44, resized to the model's 8x8" in notes[0]
    assert "looks like a grid of 2x3 images" in notes[0]
    assert "the whole grid becomes one image" in notes[0] and "--n 1" in notes[0]
    # A plain image of the same size is not called a grid.
    images.save_image(big_pixels(44, 64), tmp_path / "plain.png")
    _, notes = generate_warned(denoiser_pipe(meta, x0), init_image=tmp_path / "plain.png",
                               strength=0.5)
    assert len(notes) == 1 and "looks like a grid" not in notes[0]


def test_init_image_resize_notice_on_the_cli(model: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(big_pixels()).save(tmp_path / "big.png")
    code, _, err = run(["sample", "--model", str(model), "--backend", "ort-cpu", "--n", "2",
                        "--init-image", str(tmp_path / "big.png"), "--out",
                        str(tmp_path / "g.png")], capsys)
    assert code == 0, err
    notes = [ln for ln in err.splitlines() if ln.startswith("warning: ")]
    assert notes == [f"warning: init_image {str(tmp_path / 'big.png')!r} is 12x20, resized to "
                     "the model's 8x8"]


# ---------------------------------------------------------------------------------
# The API's default steps are the CLI's
# ---------------------------------------------------------------------------------


def test_generate_defaults_to_the_models_own_steps(meta: ModelMeta, x0: np.ndarray) -> None:
    pipe = denoiser_pipe(meta, x0)
    assert pipe.default_steps() == 3  # distilled for 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "distilled for 3 steps" warning either
        out = pipe.generate(2)
    assert pipe.last_info is not None and pipe.last_info.steps == 3
    np.testing.assert_array_equal(out, pipe.generate(2, 3))
    assert pipe.generate(1, output="samples").shape == (1, 3, SIZE, SIZE)
    plain = oo.make_meta("v_prediction", num_classes=3, size=SIZE)  # nothing recorded
    bare = denoiser_pipe(plain, x0)
    bare.generate(1)
    assert bare.last_info is not None and bare.last_info.steps == 4 == bare.default_steps()


# ---------------------------------------------------------------------------------
# Progress: a bar on a terminal, plain lines elsewhere
# ---------------------------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_only_on_a_terminal() -> None:
    for stream, drawn in ((Terminal(), True), (io.StringIO(), False)):
        with clitools.Progress(3, "export", unit="stage", stream=stream) as bar:
            assert bar.drawing is drawn
            bar.stage("trace model.onnx")
            bar.advance()
            bar.line("exporting model.onnx")
            bar.advance(2)
        text = stream.getvalue()
        assert "exporting model.onnx\n" in text
        assert ("\r" in text and "export" in text and "trace model.onnx" in text) is drawn
        if not drawn:
            assert text == "exporting model.onnx\n"


def test_sample_progress_on_a_terminal_and_in_a_log(
        model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli_sample, "PROGRESS_DELAY", 0.0)
    argv = ["--model", str(model), "--backend", "ort-cpu", "--n", "6", "--batch-size", "2",
            "--out", str(tmp_path / "g.png")]
    for stream in (Terminal(), io.StringIO()):
        monkeypatch.setattr(sys, "stderr", stream)
        assert cli_sample.main(argv) == 0
        err = stream.getvalue()
        assert "6 images, 3 steps" in err
        if isinstance(stream, Terminal):
            assert "\r" in err and ("image/s" in err or "s/image" in err)
            assert "  6/6 images" not in err.splitlines()  # the bar replaces the lines
        else:
            assert "\r" not in err and "\x1b" not in err
            assert "  6/6 images" in err.splitlines()  # the last batch, always said
            assert len(err.splitlines()) <= 4  # loaded, first batch, last batch, summary


# ---------------------------------------------------------------------------------
# Help without torch, one error prefix, `fewstep info` columns
# ---------------------------------------------------------------------------------

NO_TORCH = ("import sys; sys.modules['torch'] = None; "  # `import torch` raises ImportError
            "from fewstep.runtime.cli import main; sys.exit(main(sys.argv[1:]))")


@pytest.mark.parametrize(("command", "flag"), [
    ("train", "--preset {base,small,tiny}"), ("export", "--fused"), ("check", "--against"),
    ("eval", "--steps"),
])
def test_torch_commands_show_their_help_without_torch(command: str, flag: str) -> None:
    helped = subprocess.run([sys.executable, "-c", NO_TORCH, command, "--help"],
                            capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr
    assert flag in helped.stdout


def test_train_without_torch_is_one_error_line(tmp_path: Path) -> None:
    ran = subprocess.run([sys.executable, "-c", NO_TORCH, "train", "--steps", "1", "--out",
                          str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2
    lines = ran.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), ran.stderr
    assert "needs the 'torch' package" in lines[0] and "fewstep[train]" in lines[0]


def test_every_error_starts_the_same(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["smaple"], ["sample", "--n", "0", "--out", "g.png"],
                 ["sample", "--model", str(model), "--steps", "2000", "--out", "g.png"]):
        code, _, err = run(argv, capsys)
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_info_columns_line_up(model: Path) -> None:
    info = cli_info.collect(model)
    sampler = {**info["graphs"][0], "file": "model.sampler-4.onnx", "kind": "sampler",
               "steps": 4, "spacing": "trailing", "eta": 0.0, "output_format": "uint8",
               "guidance": True, "size_bytes": 259_584}
    info["graphs"].append(sampler)
    info["shared_files"] = {"model.weights.029b80e8cc67.bin": 7_130_000}  # a long name
    text = cli_info.render(info)
    rows = text.split("graphs\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(rows) == 4 and rows[-1].split()[:2] == ["model.weights.029b80e8cc67.bin",
                                                        "weights"]
    kind_starts = {re.match(r"  \S+\s+", row).end() for row in rows}  # type: ignore[union-attr]
    size_ends = {re.search(r"\d (B|KiB|MiB|GiB)", row).end() for row in rows}  # type: ignore[union-attr]
    assert len(kind_starts) == 1 and len(size_ends) == 1, text
    assert "steps=4 spacing=trailing eta=0 -> uint8" in rows[-2]
    assert "distilled    3 steps (trailing)" in text
    info["model"]["distilled_steps"] = [1]
    assert "distilled    1 step (trailing)" in cli_info.render(info)


# ---------------------------------------------------------------------------------
# Package metadata and the version
# ---------------------------------------------------------------------------------


def test_version_has_one_owner_and_the_metadata_says_what_fewstep_is(
        capsys: pytest.CaptureFixture[str]) -> None:
    import fewstep.runtime

    version = metadata.version("fewstep")
    assert fewstep.runtime.__version__ == version
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out == f"fewstep {version}\n"
    meta = metadata.metadata("fewstep")
    assert meta.get("License-Expression") == "MIT" or meta.get("License") == "MIT"
    classifiers = meta.get_all("Classifier") or []
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert "Programming Language :: Python :: 3.12" in classifiers
    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().startswith("MIT License")
