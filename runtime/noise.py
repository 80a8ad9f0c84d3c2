"""Host-side noise: numpy Philox keyed by (seed, image index).

Image i of a generation draws its initial noise x_T and then its per-step noise from
its own stream, so an image does not depend on the batch it was generated in, on how
many images were asked for, or on the backend.

``generation_noise`` keeps one Philox bit generator per thread and sets its key and
counter for each image: the stream ``image_rng`` gives, without constructing a bit
generator (whose constructor draws OS entropy for a seed the key then replaces) for
every image of every call.
"""

from __future__ import annotations

import threading

import numpy as np
from numpy.typing import NDArray

from . import checks

MAX_SEED = 2**64 - 1


def check_seed(seed: object) -> int:
    number = checks.whole_number("seed", seed, fix="; pass e.g. seed=0")
    if not 0 <= number <= MAX_SEED:
        raise ValueError(f"seed={number} is outside 0..2**64-1; pass a seed in that range")
    return number


def _key(seed: int, index: int) -> NDArray[np.uint64]:
    """The Philox key of image ``index`` of ``seed``: the one place the stream is named."""
    return np.array([check_seed(seed), index], dtype=np.uint64)


def image_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.Generator(np.random.Philox(key=_key(seed, index)))


_PER_THREAD = threading.local()


def _keyed_rng(seed: int, index: int) -> np.random.Generator:
    """``image_rng(seed, index)``'s stream from this thread's reused bit generator; valid
    until the thread's next call (``generation_noise`` draws from it at once)."""
    key = _key(seed, index)
    state = getattr(_PER_THREAD, "state", None)
    if state is None:
        bits = np.random.Philox(key=key)
        _PER_THREAD.state = state = (bits, np.random.Generator(bits), bits.state)
        return state[1]
    bits, rng, fresh = state
    fresh["state"]["key"] = key
    bits.state = fresh  # counter 0, empty buffer: a new stream for this key
    return rng  # type: ignore[no-any-return]


def generation_noise(
    seed: int,
    indices: range,
    shape: tuple[int, ...],
    noise_steps: int = 0,
) -> tuple[NDArray[np.float32], NDArray[np.float32] | None]:
    """(x_T (N, *shape), step noise (N, noise_steps, *shape) or None) for ``indices``."""
    x_T = np.empty((len(indices), *shape), dtype=np.float32)
    step_noise = (
        np.empty((len(indices), noise_steps, *shape), dtype=np.float32) if noise_steps else None
    )
    for row, i in enumerate(indices):
        rng = _keyed_rng(seed, i)
        x_T[row] = rng.standard_normal(shape, dtype=np.float32)
        if step_noise is not None:
            step_noise[row] = rng.standard_normal((noise_steps, *shape), dtype=np.float32)
    return x_T, step_noise
