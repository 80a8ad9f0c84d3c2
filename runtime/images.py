"""Pixels in and out: model range [-1, 1] ↔ uint8, grids, init images and masks.

Written images take the format their file extension names (``.png``, ``.jpg``,
``.webp``, ``.bmp``, ``.tiff``, ... whatever this Pillow can write); an extension
Pillow cannot write is refused before any work. A written image is at most
``MAX_GRID_PIXELS`` pixels after enlarging.
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import os
import warnings
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from . import checks
from .fileio import atomic_path

GRID_PAD: Final = 2
MAX_SCALE_GUESS: Final = 64  # enlargements tried when asking whether an image is a grid
MAX_INPUT_PIXELS: Final = 50_000_000  # an init image or mask, checked before decoding
MAX_INPUT_BYTES: Final = 256 * 1024**2  # its file, checked before reading
MAX_GRID_PIXELS: Final = 100_000_000  # 100 megapixels: ~300 MB as RGB, ~1 GB while saving
# Largest width or height some formats can store (Pillow would fail or shrink the image).
MAX_SIDE: Final = {"JPEG": 65_500, "WEBP": 16_383, "GIF": 65_535, "ICO": 256, "ICNS": 1024}
COMMON_EXTENSIONS: Final = (".png", ".jpg", ".webp", ".bmp", ".tiff")
_MODES: Final = {1: "L", 3: "RGB", 4: "RGBA"}
_QUALITY: Final = {"JPEG": 95, "WEBP": 95}  # Pillow's default (75) blurs small images


def to_pixel_values(x: Any) -> Any:
    """[-1, 1] → [0, 255], rounded half to even (numpy, torch and ONNX ``Round`` agree)."""
    return ((x.clip(-1, 1) + 1) * 127.5).round()  # works on numpy and torch alike


def to_uint8_nhwc(x: NDArray[np.floating[Any]]) -> NDArray[np.uint8]:
    """(B, C, H, W) float in [-1, 1] → (B, H, W, C) uint8."""
    return np.ascontiguousarray(to_pixel_values(x).astype(np.uint8).transpose(0, 2, 3, 1))


def from_uint8_nhwc(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """(B, H, W, C) uint8 → (B, C, H, W) float32 in [-1, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0


def grid_size(n: int, height: int, width: int, nrow: int | None = None,
              pad: int = GRID_PAD) -> tuple[int, int]:
    """(height, width) in pixels of the grid ``grid`` makes of ``n`` images of that size."""
    cols = nrow if nrow else max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    return rows * (height + pad) + pad, cols * (width + pad) + pad


def grid(images: NDArray[np.uint8], nrow: int | None = None,
         pad: int = GRID_PAD) -> NDArray[np.uint8]:
    """Tile (N, H, W, C) uint8 images into one (rows*H, cols*W, C) image."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"expected a non-empty (N, H, W, C) uint8 array, got {images.dtype} {images.shape}"
        )
    n, h, w, c = images.shape
    cols = nrow if nrow else max(1, math.ceil(math.sqrt(n)))
    out = np.full((*grid_size(n, h, w, nrow, pad), c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y : y + h, x : x + w] = img
    return out


def _can_write(fmt: str | None, mode: str) -> bool:
    """Whether this Pillow really writes ``mode`` images as ``fmt`` (some formats have
    only a stub writer, or lack their codec in this build)."""
    from PIL import Image

    if fmt is None or fmt not in Image.SAVE:
        return False
    try:
        Image.new(mode, (1, 1)).save(io.BytesIO(), format=fmt)
    except Exception:  # a probe: any failure means "cannot"
        return False
    return True


def image_format(path: str | os.PathLike[str], channels: int = 3) -> str:
    """The Pillow format the extension of ``path`` names (``.jpg`` → ``JPEG``) when this
    Pillow can write ``channels``-channel images in it, else a ValueError naming the
    extension and the ones that work."""
    from PIL import Image

    p = Path(path)
    ext = p.suffix.lower()
    Image.init()
    known = Image.registered_extensions()
    fmt = known.get(ext) if ext else None
    mode = _MODES.get(channels, "RGB")
    if _can_write(fmt, mode):
        assert fmt is not None
        return fmt
    usable = ", ".join(e for e in COMMON_EXTENSIONS if _can_write(known.get(e), mode))
    if not ext:
        what = "has no file extension"
    elif _can_write(fmt, "RGB"):
        what = f"ends in {ext!r}, but Pillow cannot write {mode} images as {fmt}"
    else:
        what = f"ends in {ext!r}, an image format this Pillow cannot write"
    raise ValueError(f"output {str(p)!r} {what}; end the file name in one of {usable}")


def save_image(array: NDArray[np.uint8], path: str | os.PathLike[str], scale: int = 1,
               format: str | None = None) -> None:
    """Write an (H, W, C) uint8 array atomically, in the format the extension of ``path``
    names (``format`` overrides: a Pillow format name such as ``"PNG"``); ``scale``
    enlarges it (nearest neighbour). A ValueError, before any write, for an extension
    Pillow cannot write or an image over ``MAX_GRID_PIXELS`` or the format's size limit.
    """
    from PIL import Image

    if array.ndim != 3 or array.dtype != np.uint8 or array.shape[-1] not in _MODES:
        raise ValueError(f"expected an (H, W, C) uint8 array with C in 1, 3 or 4, got "
                         f"{array.dtype} {array.shape}")
    scale = checks.whole_number("scale", scale, 1)
    fmt = format or image_format(path, array.shape[-1])
    h, w = array.shape[0] * scale, array.shape[1] * scale
    if h * w > MAX_GRID_PIXELS:
        raise ValueError(
            f"a {array.shape[1]}x{array.shape[0]} image enlarged {scale} times would be "
            f"{w}x{h} pixels, over the limit of {MAX_GRID_PIXELS:,}; pass a smaller scale or "
            "fewer images")
    side = MAX_SIDE.get(fmt)
    if side is not None and max(h, w) > side:
        raise ValueError(
            f"{fmt} stores images up to {side} pixels a side and this one would be {w}x{h}; "
            f"write a .png, or pass a smaller scale or fewer images")
    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((w, h), Image.Resampling.NEAREST)
    extra: dict[str, Any] = {"quality": _QUALITY[fmt]} if fmt in _QUALITY else {}
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            img.save(f, format=fmt, **extra)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, OSError) and (e.filename or e.errno):  # the file system (a full
            raise  # disk, a read-only mount): the CLI names it and the fix; not the encoder
        other = "; write a .png instead" if fmt != "PNG" else ""
        raise ValueError(f"Pillow cannot write {os.fspath(path)!r} as {fmt} ({e}){other}"
                         ) from None


class _TooLarge(ValueError):
    """An input image over ``MAX_INPUT_PIXELS`` (found from its header, before decoding)."""


def _open(path: str | os.PathLike[str]) -> Any:
    """An image file as a loaded PIL image, or a ValueError naming the file; its size in
    bytes and in pixels is checked before it is decoded."""
    from PIL import Image, UnidentifiedImageError

    name = os.fspath(path)
    try:
        size_bytes = os.stat(path).st_size
    except OSError as e:
        raise ValueError(f"cannot read image {name!r}: {e.strerror}") from None
    if size_bytes > MAX_INPUT_BYTES:
        raise ValueError(f"image {name!r} is {size_bytes:,} bytes, over the limit of "
                         f"{MAX_INPUT_BYTES:,} for an input image; pass a smaller image")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning: the size is checked below, before decoding.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as im:
            w, h = im.size
            if w * h > MAX_INPUT_PIXELS:
                raise _TooLarge(f"image {name!r} is {w}x{h} pixels, over the limit of "
                                 f"{MAX_INPUT_PIXELS:,} for an input image; pass a smaller "
                                 "image")
            im.load()
            return im.copy()
    except Image.DecompressionBombError:
        raise ValueError(f"image {name!r} declares more pixels than Pillow decodes "
                         f"(a decompression bomb?); the limit for an input image is "
                         f"{MAX_INPUT_PIXELS:,} pixels: pass a smaller image") from None
    except _TooLarge:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image {name!r}: {e}") from None


def _to_mode(im: Any, channels: int) -> Any:
    """A PIL image as L (1 channel) or RGB; transparency is composited over white."""
    from PIL import Image

    if im.mode in ("RGBA", "LA", "P", "PA") or "transparency" in im.info:
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, im)
    return im.convert("L" if channels == 1 else "RGB")


def _is_pil(image: object) -> bool:
    from PIL import Image

    return isinstance(image, Image.Image)


def _describe(image: Any) -> str:
    if isinstance(image, (str, os.PathLike)):
        return repr(os.fspath(image))
    if _is_pil(image):
        return "(PIL image)"
    return f"(array {np.shape(image)})"


def looks_like_grid(pixels: NDArray[np.uint8], size: tuple[int, int]) -> tuple[int, int] | None:
    """(rows, cols) when ``pixels`` (H', W'[, C]) have the layout ``grid`` gives images of
    ``size`` = (H, W) at some enlargement, white frame included, else None. One image in a
    frame counts: it is padded all the same."""
    h, w = size
    height, width = pixels.shape[:2]
    for scale in range(1, MAX_SCALE_GUESS + 1):
        if width % scale or height % scale:
            continue
        gw, gh = width // scale - GRID_PAD, height // scale - GRID_PAD
        if gw <= 0 or gh <= 0 or gw % (w + GRID_PAD) or gh % (h + GRID_PAD):
            continue
        pad = GRID_PAD * scale
        frame = np.concatenate([pixels[:pad].reshape(-1), pixels[-pad:].reshape(-1),
                                pixels[:, :pad].reshape(-1), pixels[:, -pad:].reshape(-1)])
        if np.all(frame == 255):
            return gh // (h + GRID_PAD), gw // (w + GRID_PAD)
    return None


def _resize_notice(what: str, image: object, src: tuple[int, int], size: tuple[int, int],
                   pixels: NDArray[np.uint8] | None) -> str:
    """One line: ``what`` (from ``image``) of ``src`` = (H, W) is resized to ``size``."""
    (sh, sw), (h, w) = src, size
    text = f"{what} {_describe(image)} is {sw}x{sh}, resized to the model's {w}x{h}"
    layout = None if pixels is None else looks_like_grid(pixels, size)
    if layout is not None:
        rows, cols = layout
        text += (f"; it looks like a grid of {rows}x{cols} images with a white frame: the "
                 "whole grid becomes one image; pass a single image (fewstep sample --n 1 "
                 "writes one, --out-dir one file per image)")
    return text


def _resize_pil(im: Any, size: tuple[int, int], nearest: bool = False) -> Any:
    from PIL import Image

    if im.size == (size[1], size[0]):
        return im
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return im.resize((size[1], size[0]), method)


def _check_pixels(h: int, w: int, what: str, image: object) -> None:
    if h < 1 or w < 1 or h * w > MAX_GRID_PIXELS:
        raise ValueError(f"{what} {_describe(image)} is {w}x{h}; pass an image of 1 to "
                         f"{MAX_GRID_PIXELS:,} pixels")


def load_image(
    path: str | os.PathLike[str], size: tuple[int, int], channels: int = 3
) -> NDArray[np.float32]:
    """An image file as (C, H, W) float32 in [-1, 1], resized to ``size`` = (H, W)."""
    out: NDArray[np.float32] = init_images(path, (channels, *size), notify=False)[0]
    return out


def load_mask(path: str | os.PathLike[str], size: tuple[int, int]) -> NDArray[np.float32]:
    """A mask image as (1, H, W) float32 in {0, 1}: 1 (white) = regenerate, 0 = keep."""
    out: NDArray[np.float32] = masks(path, size, notify=False)[0]
    return out


def init_images(image: Any, shape: tuple[int, int, int], what: str = "init image",
                notify: bool = True) -> NDArray[np.float32]:
    """Init images as (k, C, H, W) float32 in [-1, 1] for a model of ``shape`` = (C, H, W).

    ``image``: a file path, a PIL image, uint8 pixels (H', W'), (H', W', C') or
    (k, H', W', C') with C' in 1, 3, 4, or floats in [-1, 1] (C, H', W') or (k, C, H', W').
    Any size: another size is resized (bicubic) with a one-line ``UserWarning`` saying so
    (``notify``); transparency is composited over white.
    """
    c, h, w = shape
    if isinstance(image, (str, os.PathLike)) or _is_pil(image):
        im = _open(image) if isinstance(image, (str, os.PathLike)) else image
        _check_pixels(im.size[1], im.size[0], what, image)
        im = _to_mode(im, c)
        if im.size != (w, h) and notify:
            warnings.warn(_resize_notice(what, image, (im.size[1], im.size[0]), (h, w),
                                         np.asarray(im)), stacklevel=5)
        arr = np.asarray(_resize_pil(im, (h, w)), dtype=np.uint8)
        arr = arr[..., None] if arr.ndim == 2 else arr
        return from_uint8_nhwc(arr[None])
    a = np.asarray(image)
    if a.dtype == np.uint8:
        if a.ndim == 2:
            a = a[..., None]
        a = a[None] if a.ndim == 3 else a
        if a.ndim != 4 or a.shape[-1] not in _MODES or 0 in a.shape:
            raise ValueError(
                f"{what} of shape {np.shape(image)} (uint8) is not one or more images; pass "
                f"(H, W), (H, W, C) or (n, H, W, C) uint8 with C in 1, 3 or 4, floats "
                f"({c}, H, W) in [-1, 1], a PIL image or a file path")
        _check_pixels(a.shape[1], a.shape[2], what, image)
        if a.shape[1:] == (h, w, c):
            return from_uint8_nhwc(a)
        from PIL import Image

        if a.shape[1:3] != (h, w) and notify:
            warnings.warn(_resize_notice(what, image, a.shape[1:3], (h, w), a[0]),
                          stacklevel=5)
        out = []
        for one in a:
            im = Image.fromarray(one[..., 0] if one.shape[-1] == 1 else one)
            px = np.asarray(_resize_pil(_to_mode(im, c), (h, w)), dtype=np.uint8)
            out.append(px[..., None] if px.ndim == 2 else px)
        return from_uint8_nhwc(np.stack(out))
    a = a[None] if a.ndim == 3 else a
    if a.ndim != 4 or a.shape[1] != c or 0 in a.shape or not np.issubdtype(
            a.dtype, np.floating):
        raise ValueError(
            f"{what} of shape {np.shape(image)} ({a.dtype}) is not one or more images of this "
            f"model's {c} channels; pass floats ({c}, H, W) or (n, {c}, H, W) in [-1, 1], "
            f"uint8 (H, W, {c}), a PIL image or a file path")
    _check_pixels(a.shape[2], a.shape[3], what, image)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or Inf; pass finite values in [-1, 1]")
    if a.shape[2:] == (h, w):
        return np.ascontiguousarray(a, dtype=np.float32)
    if notify:
        warnings.warn(_resize_notice(what, image, a.shape[2:], (h, w), None), stacklevel=5)
    resized = _resize_float(a.astype(np.float32), (h, w), nearest=False)
    lo, hi = float(a.min()), float(a.max())
    return np.ascontiguousarray(resized.clip(lo, hi), dtype=np.float32)  # no bicubic overshoot


def _resize_float(a: NDArray[np.float32], size: tuple[int, int],
                  nearest: bool) -> NDArray[np.float32]:
    """(k, C, H', W') float32 → (k, C, H, W), each channel resized by Pillow (mode F)."""
    from PIL import Image

    k, c = a.shape[:2]
    out = np.empty((k, c, *size), np.float32)
    for i in range(k):
        for j in range(c):
            im = _resize_pil(Image.fromarray(np.ascontiguousarray(a[i, j]), mode="F"), size,
                             nearest)
            out[i, j] = np.asarray(im, dtype=np.float32)
    return out


def masks(mask: Any, size: tuple[int, int], what: str = "mask",
          notify: bool = True) -> NDArray[np.float32]:
    """Inpainting masks as (k, 1, H, W) float32 in [0, 1] (1 = regenerate, 0 = keep) for
    images of ``size`` = (H, W).

    ``mask``: a file path or PIL image (white = regenerate; any pixel above mid-grey
    counts), or an array (H', W'), (k, H', W') or (k, 1, H', W'): uint8/bool (non-zero =
    regenerate) or floats in [0, 1]. Any size: another size is resized (nearest
    neighbour, so no new values appear) with a one-line ``UserWarning`` (``notify``).
    """
    h, w = size
    if isinstance(mask, (str, os.PathLike)) or _is_pil(mask):
        im = _open(mask) if isinstance(mask, (str, os.PathLike)) else mask
        _check_pixels(im.size[1], im.size[0], what, mask)
        im = _to_mode(im, 1)
        if im.size != (w, h) and notify:
            warnings.warn(_resize_notice(what, mask, (im.size[1], im.size[0]), size,
                                         np.asarray(im)[..., None]), stacklevel=5)
        px = np.asarray(_resize_pil(im, size), dtype=np.uint8)
        return (px > 127).astype(np.float32)[None, None]
    a = np.asarray(mask)
    if a.ndim == 2:
        a = a[None, None]
    elif a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[1] != 1 or 0 in a.shape or not (
            a.dtype == np.bool_ or np.issubdtype(a.dtype, np.number)):
        raise ValueError(
            f"{what} of shape {np.shape(mask)} ({a.dtype}) is not one or more masks; pass "
            f"(H, W), (n, H, W) or (n, 1, H, W) with 1 = regenerate and 0 = keep, a PIL "
            "image or a file path")
    _check_pixels(a.shape[2], a.shape[3], what, mask)
    if a.dtype == np.uint8 or a.dtype == np.bool_:
        m = (a > 0).astype(np.float32)
    else:
        m = a.astype(np.float32)
        if not np.all((m >= 0) & (m <= 1)):
            raise ValueError(f"{what} values must be in [0, 1] (1 = regenerate, 0 = keep)")
    if a.shape[2:] != (h, w):
        if notify:
            warnings.warn(_resize_notice(what, mask, a.shape[2:], size, None), stacklevel=5)
        m = _resize_float(m, size, nearest=True)
    return np.ascontiguousarray(m, dtype=np.float32)


@functools.lru_cache(maxsize=8)
def nonfinite_marker(shape_hwc: tuple[int, int, int]) -> NDArray[np.uint8]:
    """The (H, W, C) uint8 image a uint8 sampler graph outputs in place of an image that had
    a NaN/Inf value (a uint8 cast would silently turn it into a black or saturated picture).

    Bytes of SHA-256 over a fixed text and a counter: the same on every machine and numpy
    version, and no real generation matches all of its H·W·C bytes (the runtime compares
    them all and raises ``NumericalError``). Cached (every uint8 generation checks against
    it), so the array is read-only.
    """
    h, w, c = shape_hwc
    n = h * w * c
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(b"fewstep nonfinite marker %d" % i).digest()
        i += 1
    marker: NDArray[np.uint8] = np.frombuffer(bytes(out[:n]), dtype=np.uint8).reshape(h, w, c)
    return marker  # frombuffer over bytes: read-only


def nonfinite_images(images: NDArray[np.uint8]) -> NDArray[np.intp]:
    """Indices of the (N, H, W, C) images that are the ``nonfinite_marker``."""
    n = images.shape[0]
    h, w, c = images.shape[1:4]
    marker = nonfinite_marker((h, w, c))
    same = np.all(images.reshape(n, -1) == marker.reshape(1, -1), axis=1)
    return np.flatnonzero(same)


def to_uint8_nhwc_marked(x: NDArray[np.floating[Any]]) -> NDArray[np.uint8]:
    """``to_uint8_nhwc`` with the uint8 sampler graph's contract: an image with any NaN/Inf
    value becomes the ``nonfinite_marker`` (what the exported graph does, for oracles)."""
    finite = np.all(np.isfinite(x.reshape(x.shape[0], -1)), axis=1)
    out = to_uint8_nhwc(np.where(np.isfinite(x), x, 0.0))
    h, w, c = out.shape[1:4]
    out[~finite] = nonfinite_marker((h, w, c))
    return out

