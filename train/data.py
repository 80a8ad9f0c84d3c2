"""Training images: built-in procedural landscapes and the user's own image folder.

numpy + Pillow only (no torch). Every source maps a global sample index ``i = 0, 1, 2, ...``
to one ``(uint8 (H, W, 3) RGB image, class label)`` pair, so resuming a run and sharding it
over worker processes are exact.

* ``render_landscape(seed, index)``: one procedural scene; the label is the scene kind.
* ``ImageFolder.scan(root, size)``: sub-folders are classes; every file is checked up front.
* ``open_source(spec, size, seed)``: ``"landscapes"`` or a folder path -> ``ImageSource``.
* ``to_model_range(batch)``: uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from fewstep.runtime.errors import quote, some_of
from fewstep.runtime.meta import MAX_CLASSES, class_name_problem

__all__ = [
    "EXTENSIONS", "LANDSCAPE_CLASSES", "DataError", "FolderSource", "ImageFolder",
    "ImageSource", "Landscapes", "open_source", "render_landscape", "to_model_range",
]

LANDSCAPE_CLASSES: tuple[str, ...] = ("mountains", "lake", "snow", "forest", "sunset", "night")
EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

F32 = NDArray[np.float32]
FA = NDArray[np.floating[Any]]  # float arrays inside the renderer (float32 in practice)
U8 = NDArray[np.uint8]
RGB = tuple[float, float, float]
_SS = 2  # supersampling: draw at 2 * size, then 2x2 box-downsample (anti-aliasing)
_SNOW = np.asarray((0.94, 0.96, 1.0), np.float32)
_DAY_TOP, _DAY_LOW = (0.22, 0.45, 0.85), (0.68, 0.83, 0.96)
_ROCK: tuple[RGB, ...] = ((0.48, 0.46, 0.47), (0.47, 0.38, 0.30), (0.40, 0.36, 0.33),
                          (0.55, 0.50, 0.42))


class DataError(ValueError):
    """A bad data spec, folder or image file; the message names the path and the fix."""


# ------------------------------------------------------------------ procedural landscapes


class _Uniform:
    """Scalar uniform draws served from one block of draws (fast; fixed count per scene)."""

    def __init__(self, rng: np.random.Generator, count: int = 96) -> None:  # a scene uses < 60
        self._vals: Iterator[float] = iter(rng.random(count).tolist())

    def __call__(self, lo: float = 0.0, hi: float = 1.0) -> float:
        return lo + (hi - lo) * next(self._vals)

    def rgb(self, rgb: RGB, jitter: float) -> F32:
        """A colour with a little random variation, kept in [0, 1]."""
        return np.asarray([min(max(c + self(-jitter, jitter), 0.0), 1.0) for c in rgb], np.float32)


@dataclass
class _Look:
    """Colours and layout of one scene; y is measured from the top, in image heights."""

    sky: list[tuple[float, F32]]  # gradient stops (y, colour)
    ridges: list[F32]  # base colours, far -> near
    span: tuple[float, float]  # mean y of the far and the near ridge
    amp: tuple[float, float]  # height amplitude of the far and the near ridge
    light: float = 0.0  # slope shading strength; the sign picks the lit side
    haze: float = 0.5  # far ridges fade this much towards the sky behind them
    sun: RGB | None = None  # (x, y, radius) of the sun or moon
    sun_rgb: F32 = field(default_factory=lambda: np.ones(3, np.float32))
    glow: float = 0.0
    crescent: float = 0.0  # moon bite offset in radii, signed (0 = full moon)
    stars: int = 0
    water: float | None = None  # water line
    water_rgb: F32 = field(default_factory=lambda: np.zeros(3, np.float32))
    snow: float | None = None  # snow line on the far ridge; the nearest ridge is all snow
    trees: float = 0.0  # tree height on ridges (0 = bare)
    peaks: bool = False  # sharp mountain peaks instead of rounded hills


def _look(kind: str, u: _Uniform) -> _Look:
    """Draw the colours and layout of one scene of the given kind."""
    n = 2 + int(u(0, 2.999))  # ridge count, 2..4
    side = 1.0 if u() < 0.5 else -1.0
    day = [(0.0, u.rgb(_DAY_TOP, 0.06)), (0.6, u.rgb(_DAY_LOW, 0.04))]
    sun = (u(0.1, 0.9), u(0.1, 0.3), u(0.045, 0.075))
    if kind == "mountains":
        rock = [u.rgb(_ROCK[int(u(0, 3.999))], 0.05) for _ in range(n)]
        return _Look(day, rock, (u(0.3, 0.4), u(0.65, 0.8)), (u(0.2, 0.3), u(0.08, 0.14)),
                     light=0.35 * side, haze=0.4, sun=sun, sun_rgb=u.rgb((1.0, 0.96, 0.8), 0.03),
                     glow=0.35, peaks=True)
    if kind == "lake":
        line = u(0.58, 0.72)
        hills = [u.rgb((0.35, 0.42, 0.30), 0.08) for _ in range(n)]
        return _Look(day, hills, (u(0.3, 0.38), line - 0.06), (u(0.15, 0.25), 0.05),
                     light=0.3 * side, sun=sun, glow=0.3, water=line,
                     water_rgb=u.rgb((0.10, 0.25, 0.40), 0.05))
    if kind == "snow":
        pale = [(0.0, u.rgb((0.45, 0.62, 0.86), 0.05)), (0.6, u.rgb((0.82, 0.88, 0.96), 0.02))]
        rock = [u.rgb((0.38, 0.40, 0.47), 0.05) for _ in range(n)]
        return _Look(pale, rock, (u(0.28, 0.38), u(0.68, 0.8)), (u(0.2, 0.3), u(0.04, 0.08)),
                     light=0.35 * side, haze=0.3, snow=u(0.42, 0.56), peaks=True)
    if kind == "forest":
        greens = [u.rgb((0.10, u(0.30, 0.38), 0.12), 0.04) for _ in range(n)]
        return _Look(day, greens, (u(0.3, 0.42), u(0.62, 0.75)), (u(0.12, 0.2), u(0.05, 0.1)),
                     light=0.25 * side, sun=sun, glow=0.25, trees=u(0.09, 0.13))
    if kind == "sunset":
        dusk = [(0.0, u.rgb((0.30, 0.14, 0.42), 0.06)), (0.35, u.rgb((0.90, 0.40, 0.45), 0.06)),
                (0.62, u.rgb((1.00, 0.65, 0.25), 0.05))]
        dark = [u.rgb((0.16, 0.06, 0.14), 0.03) for _ in range(n)]
        water = u(0.65, 0.78) if u() < 0.5 else None
        near = water - 0.05 if water else u(0.66, 0.78)
        return _Look(dusk, dark, (u(0.45, 0.52), near), (u(0.1, 0.2), u(0.04, 0.08)), haze=0.35,
                     sun=(u(0.2, 0.8), u(0.36, 0.48), u(0.1, 0.15)), glow=0.6,
                     sun_rgb=u.rgb((1.0, 0.88, 0.55), 0.03), water=water,
                     water_rgb=u.rgb((0.35, 0.12, 0.20), 0.04))
    navy = [(0.0, u.rgb((0.01, 0.02, 0.07), 0.01)), (0.7, u.rgb((0.12, 0.17, 0.36), 0.03))]
    dark = [u.rgb((0.02, 0.025, 0.05), 0.01) for _ in range(n)]
    return _Look(navy, dark, (u(0.38, 0.48), u(0.68, 0.8)), (u(0.12, 0.22), u(0.04, 0.08)),
                 haze=0.7, sun=(u(0.15, 0.85), u(0.1, 0.25), u(0.06, 0.09)), glow=0.2,
                 sun_rgb=u.rgb((0.98, 0.97, 0.85), 0.02),
                 crescent=side * u(0.5, 0.8) if u() < 0.5 else 0.0, stars=int(u(6, 16.999)))


@lru_cache(maxsize=64)
def _octaves(knots: int, octaves: int, gain: float, s: int
             ) -> tuple[NDArray[np.intp], F32, F32, int]:
    """Knot indices (O, S), smoothstep weights (O, S), octave weights (O,), knot count."""
    n = knots << np.arange(octaves)  # knots per octave
    first = np.concatenate([[0], np.cumsum(n + 1)[:-1]])
    t = ((np.arange(s) + 0.5) / s)[None, :] * n[:, None]
    i = np.floor(t)
    f = t - i
    w = gain ** np.arange(octaves)
    out = ((i + first[:, None]).astype(np.intp), (f * f * (3.0 - 2.0 * f)).astype(np.float32),
           (2.0 * w / w.sum()).astype(np.float32))
    for a in out:
        a.flags.writeable = False  # cached
    return (*out, int((n + 1).sum()))


def _fbm(rng: np.random.Generator, rows: int, s: int, knots: int, octaves: int, gain: float
         ) -> FA:
    """Rows of 1-D fractal noise at s points: sums of octaves of smoothly interpolated random
    values. The draws do not depend on s, so a scene is the same at every resolution.
    Returns (rows, S) values in [-1, 1], mostly within +-0.5.
    """
    i, f, w, count = _octaves(knots, octaves, gain, s)
    vals = rng.random((rows, count), dtype=np.float32)
    lo = vals[:, i]  # (rows, O, S)
    out: FA = w @ (lo + (vals[:, i + 1] - lo) * f) - np.float32(1.0)
    return out


@lru_cache(maxsize=16)
def _grid(s: int) -> tuple[F32, NDArray[np.intp], F32, F32]:
    """Pixel centres (S,) in [0, 1); edge-padding indices, a box filter and a box-smoothed
    d/dx filter, so that ``np.convolve(h[edge], box, "valid")`` smooths a ridge line h (S,).
    Cached, hence read-only."""
    m = max(1, s // 32)
    edge = np.clip(np.arange(-m - 1, s + m + 1), 0, s - 1)
    box = np.full(2 * m + 3, 1.0 / (2 * m + 3), np.float32)
    diff = np.convolve(np.full(2 * m + 1, 1.0 / (2 * m + 1)), [0.5 * s, 0.0, -0.5 * s])
    out = ((np.arange(s, dtype=np.float32) + 0.5) / np.float32(s), edge, box,
           diff.astype(np.float32))
    for a in out:
        a.flags.writeable = False
    return out


def _sat(a: FA, lo: float = 0.0, hi: float = 1.0) -> FA:
    """Clamp in place (cheaper than np.clip on small arrays)."""
    return np.minimum(np.maximum(a, lo, out=a), hi, out=a)


def render_landscape(seed: int, index: int, size: int = 32, label: int | None = None
                     ) -> tuple[U8, int]:
    """Render one procedural landscape: (uint8 (size, size, 3) RGB, label).

    All randomness comes from ``default_rng([seed, index])`` (both >= 0), so equal arguments
    give identical bytes; the draws do not depend on size, so (seed, index) is one scene at
    every size >= 16. ``label`` (index into LANDSCAPE_CLASSES) defaults to ``index % 6``:
    any run of consecutive indices is class-balanced.
    """
    if seed < 0 or index < 0:
        raise ValueError(f"seed={seed}, index={index}: both must be >= 0")
    if size < 16:
        raise ValueError(f"size={size} is too small for a landscape; pass size >= 16")
    label = index % len(LANDSCAPE_CLASSES) if label is None else label
    if not 0 <= label < len(LANDSCAPE_CLASSES):
        raise ValueError(f"label={label}; pass 0..{len(LANDSCAPE_CLASSES) - 1} (LANDSCAPE_CLASSES)")
    rng = np.random.default_rng([seed, index])
    u = _Uniform(rng)
    look = _look(LANDSCAPE_CLASSES[label], u)
    s = _SS * size
    x, edge, box, diff = _grid(s)  # (S,) pixel centres in [0, 1)
    y = x[:, None]  # (S, 1) row centres, 0 = top
    # Channel-first (3, S, S) while drawing: numpy broadcasts fast over a long last axis.
    sky = look.sky[0][1][:, None] + np.zeros((1, s), np.float32)  # (3, S) colour per row
    for (p0, c0), (p1, c1) in zip(look.sky, look.sky[1:], strict=False):
        sky += (c1 - c0)[:, None] * _sat((x - p0) * (1.0 / (p1 - p0)))
    img = np.repeat(sky[:, :, None], s, axis=2)  # (3, S, S)
    stars = rng.random((3, look.stars), dtype=np.float32)  # x, y, brightness
    row, col = ((stars[:2] * [[size], [0.6 * size]]).astype(np.intp) * _SS)[::-1]
    for d in range(_SS * _SS):  # each star fills one output pixel
        img[:, row + d // _SS, col + d % _SS] = 0.3 + 0.5 * stars[2]
    if look.sun is not None:
        cx, cy, r = look.sun
        x0, x1, y0, y1 = (max(int((c - 5 * r) * s), 0) for c in (cx, cx + 10 * r, cy, cy + 10 * r))
        sx, sy, glow_box = x[x0:x1], y[y0:y1], img[:, y0:y1, x0:x1]  # the glow's bounding box
        dist = np.sqrt((sx - cx) ** 2 + (sy - cy) ** 2)  # (h, w)
        alpha = _sat((r - dist) * s + 0.5)  # anti-aliased disk coverage
        if look.crescent:
            bite = np.sqrt((sx - cx - r * look.crescent) ** 2 + (sy - cy + r * 0.3) ** 2)
            alpha *= _sat((bite - r) * s + 0.5)
        glow = look.glow * _sat(1.0 - dist / (5.0 * r)) ** 2
        glow_box += (look.sun_rgb[:, None, None] - glow_box) * (alpha + glow - alpha * glow)
    n = len(look.ridges)
    stop = s if look.water is None else int(look.water * s)  # rows from stop on are water
    lines = _fbm(rng, n, s, 2, 5, 0.5)  # (n, S) ridge lines
    if look.peaks:
        lines = 2.0 * np.abs(lines) - 0.5  # cusps pointing up: sharp peaks
    snow = look.snow + 0.05 * _fbm(rng, n, s, 8, 3, 0.6) if look.snow is not None else lines
    for k, (base, noise) in enumerate(zip(look.ridges, lines, strict=True)):
        t = k / (n - 1)  # 0 = farthest ridge, 1 = nearest
        mean = look.span[0] + (look.span[1] - look.span[0]) * t
        h = mean + (look.amp[0] + (look.amp[1] - look.amp[0]) * t) * noise  # (S,) ridge line
        smooth = np.convolve(h[edge], box, "valid")  # (S,)
        lit = 1.0 + look.light * _sat(np.convolve(h[edge], diff, "valid"), -1.0, 1.0)
        if look.trees:  # a row of conifers on the ridge line
            tx = x / (0.055 + 0.035 * t) + u()
            tall = rng.uniform(0.6, 1.0, 40).astype(np.float32)[tx.astype(np.intp)]
            tri = 1.0 - np.abs(2.0 * (tx % 1.0) - 1.0)  # (S,) one triangle per tree
            h = h - look.trees * (0.5 + 0.5 * t) * tall * tri**1.5
            lit = lit * (0.8 + 0.25 * tri)
        top = max(int(h.min() * s) - 1, 0)
        if top >= stop:
            continue
        band, yb = img[:, top:stop], y[top:stop]  # only the rows this ridge can reach
        depth = _sat(yb * 3.0 - smooth * 3.0)  # (R, S): 0 at the crest, 1 deep below
        shade = lit - depth * (lit - 0.7)  # slope light fading into shadow lower down
        tint = base + (sky[:, min(int(mean * s), s - 1)] - base) * (look.haze * (1.0 - t))
        layer = tint[:, None, None] * shade  # (3, R, S)
        if look.snow is not None:  # white above a noisy snow line; the nearest ridge all white
            snowy = _sat((snow[k] + (2.0 if k == n - 1 else 0.12 * t) - yb) * (0.5 * s))
            layer += (_SNOW[:, None, None] * (0.8 + 0.2 * shade) - layer) * snowy
        band += (layer - band) * _sat(yb * s + 0.5 - h * s)  # anti-aliased ridge coverage
    if look.water is not None:  # darkened, rippled mirror image of everything above
        below = np.arange(stop, s)
        src = np.maximum(2 * stop - 1 - below, 0)
        wave = np.sin(below * (40.0 / s) + u(0, 6.3)) * (below - stop) * (s / 2000)
        cols = np.clip(np.arange(s) + np.rint(wave)[:, None].astype(np.intp), 0, s - 1)
        streak = (0.6 + 0.05 * np.sin(below * (70.0 / s) + u(0, 6.3))).astype(np.float32)
        img[:, stop:] = img[:, src[:, None], cols] * streak[:, None]
        img[:, stop:] += look.water_rgb[:, None, None] * 0.35
        img[:, stop] = img[:, stop] * 0.6 + 0.4 * sky[:, -1:]
    half = (img[:, 0::2] + img[:, 1::2]).reshape(3, size, size, 2)  # box-downsample by _SS = 2
    out = (half[..., 0] + half[..., 1]) * np.float32(255 / 4) + np.float32(0.5)
    return _sat(out, 0.0, 255.0).transpose(1, 2, 0).astype(np.uint8, order="C"), label


# ------------------------------------------------------------------ the user's image folder


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in EXTENSIONS and not path.name.startswith(".") and path.is_file()


def _why(path: Path, exc: Exception) -> str:
    """A short reason for an unreadable file, without Pillow's repetition of the path."""
    if isinstance(exc, UnidentifiedImageError):
        return "empty file" if path.stat().st_size == 0 else "cannot identify image file"
    text = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip(" :")
    return f"{type(exc).__name__}: {text}"[:100] if text else type(exc).__name__


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB: transparency composited over white, 16/32-bit grey rescaled."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or grey.max() > 255 else 255.0
        peak = 1.0 if im.mode == "F" and grey.max() <= 1.0 else peak
        im = Image.fromarray(np.clip(grey * (255 / peak) + 0.5, 0, 255).astype(np.uint8))
    if "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


@dataclass(frozen=True)
class ImageFolder:
    """The user's images: ``root/<class>/**/<image>`` (labelled) or ``root/<image>`` (not).

    Build with ``ImageFolder.scan``. Labels index ``class_names`` (sorted folder names); an
    unlabelled folder has ``num_classes == 0`` and label 0 for every image. Hidden files and
    folders (names starting with ".") are skipped.
    """

    root: Path
    size: int
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def scan(cls, root: str | Path, size: int) -> ImageFolder:
        """List and open every image under root; all problems in one DataError naming paths."""
        root = Path(root).expanduser()
        looked = f"looked for {'/'.join(EXTENSIONS)} in any letter case"
        use = "pass a folder of images (sub-folders = classes) or 'landscapes'"
        if size < 1:
            raise DataError(f"size={size}; pass an image size >= 1")
        if not root.is_dir():
            problem = "is not a folder" if root.exists() else "does not exist"
            raise DataError(f"{root} {problem}; {use}")
        classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        found = [(p, 0) for p in sorted(root.iterdir()) if _is_image(p)]
        for folder in classes:  # class names end up in the model's metadata and on screens
            problem = class_name_problem(folder.name)
            if problem:
                raise DataError(f"class folder {quote(folder.name)} in {quote(root)}: its name "
                                f"{problem}; rename the folder")
        if len(classes) > MAX_CLASSES:
            raise DataError(f"{root} has {len(classes)} class folders, more than a model can "
                            f"hold ({MAX_CLASSES}); pass a folder with fewer classes")
        if classes and found:
            names = some_of([p.name for p in classes])
            raise DataError(f"{len(found)} images lie directly in {root} beside class folders "
                            f"({names}); move them into a class folder")
        if not classes and not found:
            raise DataError(f"no images in {root} ({looked}); {use}")
        for k, folder in enumerate(classes):
            mine = [(p, k) for p in sorted(folder.rglob("*")) if _is_image(p)
                    and not any(part.startswith(".") for part in p.relative_to(folder).parts)]
            if not mine:
                raise DataError(f"class folder {folder} has no images ({looked}); add images "
                                "or remove the folder")
            found += mine
        bad: list[str] = []
        for path, _ in found:
            try:
                with Image.open(path) as im:
                    im.verify()
            except Exception as exc:  # Pillow raises many types for broken files
                bad.append(f"{path} ({_why(path, exc)})")
        if bad:
            more = f", and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise DataError(f"{len(bad)} unreadable image{'s' * (len(bad) > 1)} under {root}: "
                            f"{', '.join(bad[:10])}{more}; remove or fix them")
        return cls(root, size, tuple(p for p, _ in found), tuple(k for _, k in found),
                   tuple(d.name for d in classes))

    def load(self, index: int) -> tuple[U8, int]:
        """Image ``index`` as uint8 (size, size, 3) RGB: shorter side resized, centre crop."""
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im.draft("RGB", (self.size, self.size))  # JPEG: decode at a reduced scale >= size
                rgb = _to_rgb(ImageOps.exif_transpose(im))
        except Exception as exc:  # e.g. truncated data that verify() could not see
            raise DataError(f"cannot read {path} ({_why(path, exc)}); remove or fix it") from exc
        w, h = rgb.size
        m = min(w, h)
        box = ((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2)  # centred square
        rgb = rgb.resize((self.size,) * 2, Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)
        return np.array(rgb, dtype=np.uint8), self.labels[index]


# ------------------------------------------------------------------ index-based sources


@runtime_checkable
class ImageSource(Protocol):
    """Global sample index i = 0, 1, 2, ... (unbounded) -> (uint8 (size, size, 3), label).

    Deterministic per i, so resuming and sharding over worker processes are exact.
    """

    @property
    def size(self) -> int: ...
    @property
    def num_classes(self) -> int: ...
    @property
    def class_names(self) -> tuple[str, ...]: ...
    def image(self, i: int) -> tuple[U8, int]: ...


@dataclass(frozen=True)
class Landscapes:
    """The built-in procedural landscapes: sample i is ``render_landscape(seed, i, size)``."""

    seed: int
    size: int
    class_names: tuple[str, ...] = LANDSCAPE_CLASSES
    num_classes: int = len(LANDSCAPE_CLASSES)

    def __post_init__(self) -> None:
        if self.seed < 0 or self.size < 16:
            raise DataError(f"seed={self.seed}, size={self.size}; landscapes need seed >= 0 "
                            "and size >= 16")

    def image(self, i: int) -> tuple[U8, int]:
        return render_landscape(self.seed, i, self.size)


class FolderSource:
    """An ImageFolder as an endless stream; every epoch is a fresh permutation of its images.

    Sample i is image ``permutation(i // len)[i % len]`` (``default_rng([seed, epoch])``),
    mirrored left-right when ``flip`` and ``default_rng([seed, i]).random() < 0.5``.
    """

    def __init__(self, folder: ImageFolder, seed: int, flip: bool = True) -> None:
        if seed < 0:
            raise DataError(f"seed={seed}; pass seed >= 0")
        self.folder, self.seed, self.flip, self.size = folder, seed, flip, folder.size
        self.num_classes, self.class_names = folder.num_classes, folder.class_names
        self._perm: tuple[int, NDArray[np.int64]] = (-1, np.zeros(0, np.int64))

    def permutation(self, epoch: int) -> NDArray[np.int64]:
        """The order in which epoch ``epoch`` visits the folder's images (cached)."""
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.folder)))
        return self._perm[1]

    def image(self, i: int) -> tuple[U8, int]:
        if i < 0:
            raise ValueError(f"sample index i={i}; pass i >= 0")
        epoch, pos = divmod(i, len(self.folder))
        img, label = self.folder.load(int(self.permutation(epoch)[pos]))
        if self.flip and np.random.default_rng([self.seed, i]).random() < 0.5:
            img = np.ascontiguousarray(img[:, ::-1])
        return img, label


def open_source(spec: str, size: int, seed: int) -> ImageSource:
    """``"landscapes"`` -> Landscapes; anything else is an image folder path -> FolderSource.

    (A folder that is literally called landscapes is reached as ``./landscapes``.)
    """
    if spec == "landscapes":
        return Landscapes(seed, size)
    if not spec:
        raise DataError("empty data spec; pass 'landscapes' or a folder of images")
    return FolderSource(ImageFolder.scan(spec, size), seed)


def to_model_range(batch: U8) -> F32:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], i.e. ``x / 127.5 - 1``."""
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 (B, H, W, 3) batch, got {batch.dtype} {batch.shape}")
    out = np.ascontiguousarray(batch.transpose(0, 3, 1, 2), dtype=np.float32)  # (B, 3, H, W)
    out /= np.float32(127.5)
    out -= np.float32(1.0)
    return out
