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

from .fileio import atomic_path

GRID_PAD: Final = 2
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
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale={scale!r} must be a whole number >= 1")
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


def load_image(
    path: str | os.PathLike[str], size: tuple[int, int], channels: int = 3
) -> NDArray[np.float32]:
    """An image file as (C, H, W) float32 in [-1, 1], resized to ``size`` = (H, W)."""
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
                                 f"{MAX_INPUT_PIXELS:,} for an input image (it is resized to "
                                 f"{size[1]}x{size[0]}); pass a smaller image")
            im.load()
            mode = "L" if channels == 1 else "RGB"
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            im = im.convert(mode).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except Image.DecompressionBombError:
        raise ValueError(f"image {name!r} declares more pixels than Pillow decodes "
                         f"(a decompression bomb?); the limit for an input image is "
                         f"{MAX_INPUT_PIXELS:,} pixels: pass a smaller image") from None
    except _TooLarge:
        raise
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image {name!r}: {e}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    out: NDArray[np.float32] = from_uint8_nhwc(arr[None])[0]
    return out


def load_mask(path: str | os.PathLike[str], size: tuple[int, int]) -> NDArray[np.float32]:
    """A mask image as (1, H, W) float32 in {0, 1}: 1 (white) = regenerate, 0 = keep."""
    m = load_image(path, size, channels=1)
    return (m > 0).astype(np.float32)


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
