"""Pixels in and out: model range [-1, 1] ↔ uint8, grids, init images and masks."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .fileio import atomic_path


def to_pixel_values(x: Any) -> Any:
    """[-1, 1] → [0, 255], rounded half to even (numpy, torch and ONNX ``Round`` agree)."""
    return ((x.clip(-1, 1) + 1) * 127.5).round()  # works on numpy and torch alike


def to_uint8_nhwc(x: NDArray[np.floating[Any]]) -> NDArray[np.uint8]:
    """(B, C, H, W) float in [-1, 1] → (B, H, W, C) uint8."""
    return np.ascontiguousarray(to_pixel_values(x).astype(np.uint8).transpose(0, 2, 3, 1))


def from_uint8_nhwc(images: NDArray[np.uint8]) -> NDArray[np.float32]:
    """(B, H, W, C) uint8 → (B, C, H, W) float32 in [-1, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)).astype(np.float32) / 127.5 - 1.0


def grid(images: NDArray[np.uint8], nrow: int | None = None, pad: int = 2) -> NDArray[np.uint8]:
    """Tile (N, H, W, C) uint8 images into one (rows*H, cols*W, C) image."""
    if images.ndim != 4 or images.dtype != np.uint8 or len(images) == 0:
        raise ValueError(
            f"expected a non-empty (N, H, W, C) uint8 array, got {images.dtype} {images.shape}"
        )
    n, h, w, c = images.shape
    cols = nrow if nrow else max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        out[y : y + h, x : x + w] = img
    return out


def save_png(array: NDArray[np.uint8], path: str | os.PathLike[str], scale: int = 1) -> None:
    """Write an (H, W, C) uint8 array as PNG, atomically; ``scale`` enlarges (nearest)."""
    from PIL import Image

    img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        img.save(f, format="PNG")


def load_image(
    path: str | os.PathLike[str], size: tuple[int, int], channels: int = 3
) -> NDArray[np.float32]:
    """An image file as (C, H, W) float32 in [-1, 1], resized to ``size`` = (H, W)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = "L" if channels == 1 else "RGB"
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            im = im.convert(mode).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise ValueError(f"cannot read image {os.fspath(path)!r}: {e}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    out: NDArray[np.float32] = from_uint8_nhwc(arr[None])[0]
    return out


def load_mask(path: str | os.PathLike[str], size: tuple[int, int]) -> NDArray[np.float32]:
    """A mask image as (1, H, W) float32 in {0, 1}: 1 (white) = regenerate, 0 = keep."""
    m = load_image(path, size, channels=1)
    return (m > 0).astype(np.float32)
