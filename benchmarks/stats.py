"""Statistics and timing of the latency suite: percentiles, the timing plan, parity.

``time_calls`` warms up, then times a call repeatedly (``TimingConfig`` says how many
times and for how long); ``summarize`` turns the samples into p50/p90/p99 and friends;
``parity`` compares two uint8 image batches (max error, PSNR).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

PSNR_IDENTICAL: Final = 100.0  # PSNR reported for bit-identical images
MIN_WARMUP_CALLS: Final = 3


# ---------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0..100), linear interpolation between order statistics."""
    if len(values) == 0:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q={q} must be in [0, 100]")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def discard_warmup(samples: Sequence[float], warmup: int) -> list[float]:
    """The samples after the first ``warmup`` (the warm-up calls are not statistics)."""
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    kept = list(samples[warmup:])
    if not kept:
        raise ValueError(f"{len(samples)} samples leave none after {warmup} warm-up calls")
    return kept


def summarize(samples_ms: Sequence[float]) -> dict[str, float | int]:
    """p50/p90/p99, mean, std (sample, ddof=1), min, max and n of timings in ms."""
    a = np.asarray(samples_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no timings to summarize")
    if not np.all(np.isfinite(a)):
        raise ValueError("timings contain NaN or Inf")
    return {
        "p50": percentile(a, 50), "p90": percentile(a, 90), "p99": percentile(a, 99),
        "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()), "max": float(a.max()), "n": int(a.size),
    }


# ---------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 10
    iters: int = 50
    max_iters: int = 2000
    target_seconds: float = 1.0
    warmup_seconds: float = 2.0
    max_config_seconds: float = 10.0
    min_iters_floor: int = 5

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.iters < 1 or self.max_iters < self.iters:
            raise ValueError(
                f"timing: warmup={self.warmup} must be >= 0 and 1 <= iters={self.iters} "
                f"<= max_iters={self.max_iters}"
            )
        if self.target_seconds <= 0 or self.max_config_seconds <= 0:
            raise ValueError("timing: target_seconds and max_config_seconds must be > 0")

    def for_network(self) -> TimingConfig:
        """Network-only timing: the same rules with half the time."""
        return dataclasses.replace(self, target_seconds=self.target_seconds / 2,
                                   max_config_seconds=self.max_config_seconds / 2,
                                   warmup_seconds=self.warmup_seconds / 2)


@dataclass
class Timed:
    samples_s: list[float]
    warmup_s: list[float]
    reduced: bool = False

    def summary_ms(self) -> dict[str, float | int]:
        return summarize([s * 1e3 for s in self.samples_s])


def plan_iterations(estimate_s: float, cfg: TimingConfig) -> tuple[int, bool]:
    """(timed calls, whether fewer than ``cfg.iters`` because each call is slow)."""
    est = max(estimate_s, 1e-7)
    n = min(cfg.max_iters, max(cfg.iters, math.ceil(cfg.target_seconds / est)))
    cap = max(cfg.min_iters_floor, int(cfg.max_config_seconds / est))
    if n > cap:
        return cap, cap < cfg.iters
    return n, False


def time_calls(call: Callable[[int], Any], cfg: TimingConfig,
               clock: Callable[[], float] = time.perf_counter,
               deadline: float | None = None) -> Timed:
    """Warm up, then time ``call(i)`` repeatedly; ``call`` must synchronise itself.

    Past ``deadline`` (a ``clock()`` value: the run's time budget) the warm-up stops after
    one call and the timing after ``min_iters_floor`` samples (a p50 of one sample says
    little, and the calls are already paid for: a compile or capture came first), and the
    result is marked ``reduced``.
    """

    def late() -> bool:
        return deadline is not None and clock() > deadline

    warm: list[float] = []
    for i in range(cfg.warmup):
        t0 = clock()
        call(i)
        warm.append(clock() - t0)
        if len(warm) >= min(MIN_WARMUP_CALLS, cfg.warmup) and sum(warm) > cfg.warmup_seconds:
            break
        if late():
            break
    if warm:
        estimate = float(np.median(warm[-MIN_WARMUP_CALLS:]))
    else:
        t0 = clock()
        call(0)
        estimate = clock() - t0
    n, reduced = plan_iterations(estimate, cfg)
    samples = []
    for i in range(n):
        t0 = clock()
        call(i)
        samples.append(clock() - t0)
        if late() and i + 1 < n and i + 1 >= cfg.min_iters_floor:
            reduced = True
            break
    return Timed(samples, warm, reduced)


# ---------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------


def parity(images: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, PSNR in dB) of two uint8 image batches (peak 255), or of two float
    sample batches (peak: the reference's range, as the export's parity gate);
    PSNR_IDENTICAL if equal."""
    if images.shape != ref.shape:
        raise ValueError(f"images {images.shape} vs reference {ref.shape}")
    pixels = images.dtype == np.uint8
    diff = images.astype(np.float64) - ref.astype(np.float64)
    mse, worst = float(np.mean(diff**2)), float(np.abs(diff).max())
    if not math.isfinite(mse):
        return math.inf, 0.0
    peak = 255.0 if pixels else (float(np.max(ref) - np.min(ref)) or 1.0)
    psnr = PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(peak**2 / mse))
    return (int(worst) if pixels else worst), psnr
