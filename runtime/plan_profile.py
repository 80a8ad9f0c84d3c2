"""Batch profiles of TensorRT plans: the (min, opt, max) batch a plan is built for, the
input shapes under it (``ModelMeta.io``), and the builder's default workspace. Pure
arithmetic: nothing here imports TensorRT or CUDA."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Final

from .checks import whole_number
from .meta import ModelMeta

# Default batch profile: 1:1:DEFAULT_MAX_BATCH (Jetson: JETSON_MAX_BATCH), scaled down
# for images larger than 128x128 so that activations stay in memory.
DEFAULT_MAX_BATCH: Final = 16
JETSON_MAX_BATCH: Final = 4
_PIXELS_AT_FULL_BATCH: Final = 128 * 128

MIB: Final = 1 << 20
GIB: Final = 1 << 30


@dataclass(frozen=True)
class BatchProfile:
    """One TensorRT optimisation profile over the batch dimension: min <= opt <= max."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        for name in ("min", "opt", "max"):
            object.__setattr__(self, name, whole_number(f"batch {name}", getattr(self, name)))
        if self.min < 1:
            raise ValueError(f"batch min={self.min} must be at least 1; pass e.g. --batch 1:4:16")
        if not self.min <= self.opt <= self.max:
            raise ValueError(
                f"batch profile {self.min}:{self.opt}:{self.max} must satisfy "
                "1 <= min <= opt <= max; pass e.g. --batch 1:4:16"
            )

    @classmethod
    def parse(cls, text: str) -> BatchProfile:
        """``"min:opt:max"`` or a single ``"N"`` (a fixed batch N:N:N)."""
        parts = text.strip().split(":")
        if len(parts) not in (1, 3) or not all(re.fullmatch(r"[+-]?\d+", p.strip()) for p in parts):
            raise ValueError(
                f"--batch {text!r} is not MIN:OPT:MAX or N (whole numbers); "
                "pass e.g. --batch 1:4:16 or --batch 8"
            )
        values = [int(p) for p in parts]
        if len(values) == 1:
            values *= 3
        lo, opt, hi = values
        return cls(lo, opt, hi)

    @property
    def fixed(self) -> bool:
        return self.min == self.max

    def __str__(self) -> str:
        return str(self.min) if self.fixed else f"{self.min}:{self.opt}:{self.max}"

    def contains(self, batch: int) -> bool:
        return self.min <= batch <= self.max


def default_profile(meta: ModelMeta, jetson: bool = False) -> BatchProfile:
    """1:1:16 on a desktop GPU (1:1:4 on Jetson), less for images above 128x128."""
    base = JETSON_MAX_BATCH if jetson else DEFAULT_MAX_BATCH
    values = math.prod(meta.sample_shape) // (meta.sample_shape[0] if meta.images else 1)
    scale = max(1, values // _PIXELS_AT_FULL_BATCH)
    return BatchProfile(1, 1, max(1, base // scale))


def profile_shapes(
    meta: ModelMeta, profile: BatchProfile
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """For every input: its (min, opt, max) shapes under ``profile`` (``meta.io``)."""
    lo, opt, hi = (meta.io.shapes(b) for b in (profile.min, profile.opt, profile.max))
    return {name: (lo[name], opt[name], hi[name]) for name in meta.graph.inputs}


def default_workspace_bytes(free: int, total: int, integrated: bool) -> int:
    """The builder's workspace limit when none is given.

    Half the free device memory, at most 8 GiB; on Jetson (integrated GPU, memory shared
    with the CPU) a quarter of the free memory, at most 2 GiB. At least 256 MiB unless
    less than that is free.
    """
    if free <= 0 or total <= 0:
        raise ValueError(f"free={free} / total={total} bytes of GPU memory make no sense")
    share, cap = (free // 4, 2 * GIB) if integrated else (free // 2, 8 * GIB)
    return max(min(share, cap), min(256 * MIB, free))
