"""The arguments of a ``Pipeline.generate`` call, their checked form, and how it ran.

``Pipeline`` keeps a request's checked preparation (``Prepared``: plan, graph, labels,
feeds) under ``prepared_key`` when its arguments are plain values, so a repeated request
only draws the seed's noise and runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from .backends import Graph
from .sampling import SamplingPlan

F32 = NDArray[np.float32]
ImageInput = Any  # a file path, a PIL image or an array: see images.init_images / masks
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class GenerationInfo:
    """How the last ``generate`` ran (``Pipeline.last_info``)."""

    path: str       # "sampler", "step", "step-blend" or "denoiser"
    graph: str      # the graph file that ran
    backend: str
    n: int
    steps: int      # network evaluations per image (fewer than plan steps for img2img)
    spacing: str
    eta: float
    batch_size: int
    seconds: float


@dataclass(frozen=True)
class GenerateRequest:
    """The arguments of one ``generate`` call, as the user gave them."""

    n: int
    steps: int | None = None
    eta: float = 0.0
    seed: int = 0
    labels: Any = None
    guidance: float | None = None
    spacing: str | None = None
    init_image: ImageInput | None = None
    strength: float = 1.0
    mask: ImageInput | None = None
    batch_size: int | None = None
    progress: Progress | None = None
    output: str | None = None
    cond: Any = None
    latents: Any = None


MAX_PREPARED: Final = 64
_PLAIN: Final = (type(None), bool, int, float, str)


@dataclass
class Prepared:
    """A checked request without its seed (``Pipeline._prepare``)."""

    n: int
    want_float: bool
    plan: SamplingPlan
    spacing: str
    guidance: float | None
    path: str
    graph: Graph
    chunk: int
    labels: NDArray[np.int64] | None
    cond: dict[str, Any]
    latents: F32 | None
    init: F32 | None
    mask: F32 | None
    feeds: dict[int, dict[str, Any]] = field(default_factory=dict)  # per batch start


def prepared_key(r: GenerateRequest) -> tuple[Any, ...] | None:
    """The key ``Pipeline`` keeps a prepared request under: its arguments with their types
    (1, 1.0 and True differ), or None when one is not a plain value (arrays, images,
    conditioning, latents: checked anew each call)."""
    if r.init_image is not None or r.mask is not None or r.cond is not None \
            or r.latents is not None:
        return None
    values = (r.n, r.steps, r.eta, r.labels, r.guidance, r.spacing, r.strength,
              r.batch_size, r.output)
    if not all(type(v) in _PLAIN for v in values):
        return None
    return tuple((type(v), v) for v in values)


def read_only(feeds: dict[str, Any]) -> dict[str, Any]:
    """``feeds`` with every array made read-only: they are reused by every call of a
    prepared request, so a backend that wrote into one would fail loudly, not silently
    change the next call."""
    for arr in feeds.values():
        if isinstance(arr, np.ndarray):
            arr.flags.writeable = False
    return feeds
