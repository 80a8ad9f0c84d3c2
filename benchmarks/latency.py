"""The latency suite's runner: the result row and the run over every configuration.

The statistics and the timing plan are in ``stats.py``, memory probes in ``probes.py``,
the paths under test (fewstep's own graphs) in ``paths.py`` and the baselines in
``baselines.py``.

Every configuration (path × steps × batch) becomes one result row (``ROW_FIELDS``).
How a row is measured (a claimed speedup is a committed row, so the method is stated):

* **End to end**: one call = host noise (``noise.generation_noise``, inside the call)
  → images → (B, H, W, C) uint8 on the host. The call returns host memory, so it has
  synchronised with the device; ``time.perf_counter`` around each call
  (clock ``perf_counter+synchronize`` on a GPU, ``perf_counter`` on the CPU).
  ``warmup`` calls first (stopped early after ``warmup_seconds`` once 3 were made), then
  ``max(iters, target_seconds / call)`` timed calls, at most ``max_iters``; a call so
  slow that this exceeds ``max_config_seconds`` gets fewer (never below
  ``min_iters_floor``), and the row's ``iterations`` says how many (also fewer when the
  run's ``--time-budget`` runs out mid-configuration, but never fewer than
  ``min_iters_floor``). Seeds rotate over
  ``SEEDS`` so the inputs change between calls; the images of the last timed call with
  seed 0 are compared with the PyTorch fp32 reference.
* **Network only**: the graph executions alone with inputs already on the device
  (``Graph.network_run``; the row's ``network_method`` says exactly what was repeated).
  Host overhead = end-to-end p50 − network p50.
* **Cold start**: ``load_ms`` (opening the graph file / moving weights to the device)
  + ``first_call_ms`` (the first call at this configuration: allocation, CUDA graph
  capture, cuDNN autotuning, torch.compile). ``cold_start_fresh`` is true on the row
  whose first call was the path's first image ever.
* **Memory**: host RSS from /proc/self/status (VmRSS, and VmHWM, the process's peak);
  device memory for torch paths from ``torch.cuda.max_memory_allocated`` (peak of the
  row, weights included), for ONNX Runtime and TensorRT the device-wide used memory
  (cudaMemGetInfo) the path has added since it was loaded, accumulated over its own rows
  only (arenas never shrink, and no other path runs meanwhile).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from .paths import FEWSTEP_BACKENDS, GRAPH_KINDS, SEEDS, BenchPath, Workload
from .probes import Cuda, host_memory_mb
from .stats import TimingConfig, parity, time_calls

BASELINES: Final = ("torch-eager", "torch-compile", "ort-steps", "diffusers-eager",
                     "diffusers-compile")
COMPILED: Final = ("torch-compile", "diffusers-compile")
DEFAULT_STEPS: Final = (1, 2, 4, 8, 20, 50)
DEFAULT_BATCHES: Final = (1, 4, 16, 64)
DEADLINE_GRACE_S: Final = 5.0  # a configuration started within the budget may run this long past it
COMPILE_MARGIN_S: Final = 90  # no torch.compile is started with less time budget left

STATUSES: Final = ("ok", "unavailable", "n/a", "skipped", "error")

# Every row has exactly these keys (None where a figure does not apply or failed; the
# row's "reason" and "notes" say why). benchmarks/results/README.md documents each.
ROW_FIELDS: Final = (
    "record", "run_id", "name", "family", "path", "backend", "graph", "mode", "precision",
    "device", "model", "steps", "batch", "status", "reason",
    "guidance", "spacing", "eta", "seed",
    "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms",
    "per_step_ms", "images_per_s",
    "network_ms", "network_p90_ms", "network_method", "host_overhead_ms", "host_overhead_pct",
    "noise_ms",
    "load_ms", "first_call_ms", "cold_start_ms", "cold_start_fresh",
    "device_mem_mb", "device_mem_method", "host_rss_mb", "host_rss_delta_mb",
    "host_peak_rss_mb",
    "max_abs_err", "psnr_db", "parity_ref",
    "iterations", "warmup", "iterations_reduced", "clock",
    "flops_per_step", "bytes_per_step_min", "floor_ms_per_step", "floor_fraction",
    "roofline_bound",
    "notes",
)


def new_row(**fields: Any) -> dict[str, Any]:
    """A result row with every ``ROW_FIELDS`` key (unknown keys are a bug)."""
    unknown = set(fields) - set(ROW_FIELDS)
    assert not unknown, f"unknown row fields {sorted(unknown)}"
    row: dict[str, Any] = dict.fromkeys(ROW_FIELDS)
    row.update(record="result", notes=[])
    row.update(fields)
    return row


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteConfig:
    models: tuple[Path, ...]
    checkpoint: Path | None = None  # the source: a checkpoint or a diffusers folder
    scheduler_config: Path | None = None
    backends: tuple[str, ...] = FEWSTEP_BACKENDS
    graphs: tuple[str, ...] = GRAPH_KINDS
    steps: tuple[int, ...] = DEFAULT_STEPS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    baselines: tuple[str, ...] = BASELINES
    compile_modes: tuple[str, ...] = ("reduce-overhead",)
    compile_steps: tuple[int, ...] = (1, 2, 4, 8)
    compile_batches: tuple[int, ...] = (1, 4)
    compile_budget_s: float = 240.0
    compile_precisions: tuple[str, ...] = ("fp16", "fp32")  # on a GPU; the CPU has fp32 only
    compile_margin_s: float = COMPILE_MARGIN_S
    guidance: float | None = 2.0
    seed: int = 0
    threads: int | None = None
    torch_threads: int | None = None
    # More fewstep ort-cuda rows, one per dict of CUDA EP options (--cuda-options).
    cuda_options: tuple[tuple[tuple[str, str], ...], ...] = ()
    timing: TimingConfig = field(default_factory=TimingConfig)
    time_budget_s: float | None = None
    roofline: bool = True
    ceilings: bool = True
    quick: bool = False
    command: str = ""


def config_priority(steps: int, batch: int) -> tuple[int, int, int]:
    """Order of configurations (tier, batch, steps). Tier 0 is batch 1 at 4 steps (the
    headline figures), then 1, 2 and 8 steps at batch 1 and 4 steps at batch 4, then the rest
    of the small grid, then everything else: under a time budget every path gets its
    most important configurations first."""
    if steps == 4 and batch == 1:
        tier = 0
    elif (batch == 1 and steps <= 8) or (steps == 4 and batch <= 4):
        tier = 1
    elif batch <= 4 and steps <= 8:
        tier = 2
    else:
        tier = 3
    return tier, batch, steps


@dataclass
class _PathState:
    load_ms: dict[Any, float] = field(default_factory=dict)  # by BenchPath.load_key
    device_mem: float = 0.0   # bytes this path added (device-wide), accumulated
    rss_base: float | None = None


class Runner:
    """Runs the jobs in order, one row each, and hands every row to ``emit``."""

    def __init__(self, cfg: SuiteConfig, run_id: str, cuda: Cuda,
                 emit: Callable[[dict[str, Any]], None],
                 reference: Any = None, roofline: Any = None,
                 log: Callable[[str], None] | None = None,
                 started: float | None = None) -> None:
        self.cfg, self.run_id, self.cuda, self.emit = cfg, run_id, cuda, emit
        self.reference = reference
        self.roofline = roofline
        self.log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        # The time budget counts from here, or from ``started`` (the run's start).
        self.started = time.perf_counter() if started is None else started
        self.compile_spent = 0.0
        self._state: dict[int, _PathState] = {}
        self._noise_ms: dict[int, float] = {}

    # -- helpers ---------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def deadline(self) -> float | None:
        """When a configuration started within the time budget cuts its timing short."""
        budget = self.cfg.time_budget_s
        return None if budget is None else self.started + budget + DEADLINE_GRACE_S

    def base_row(self, p: BenchPath, steps: int | None, batch: int | None,
                 work: Workload | None, **fields: Any) -> dict[str, Any]:
        return new_row(
            run_id=self.run_id, name=p.name, family=p.family, path=p.path, backend=p.backend,
            graph=p.graph, mode=p.mode, precision=p.precision, device=p.device, model=p.model,
            steps=steps, batch=batch,
            guidance=None if work is None else work.guidance,
            spacing=None if work is None else work.spacing,
            eta=None if work is None else work.eta, seed=self.cfg.seed, **fields)

    def noise_ms(self, work: Workload, batch: int) -> float:
        if batch not in self._noise_ms:
            t = time_calls(lambda i: work.noise(i % SEEDS, batch),
                           TimingConfig(warmup=2, iters=20, target_seconds=0.05,
                                        max_config_seconds=0.5))
            self._noise_ms[batch] = float(t.summary_ms()["p50"])
        return self._noise_ms[batch]

    def _skip_reason(self, p: BenchPath) -> str | None:
        budget = self.cfg.time_budget_s
        if budget is not None and self.elapsed() > budget:
            return f"time budget of {budget:g} s spent (--time-budget)"
        if p.path in COMPILED:
            if self.compile_spent > self.cfg.compile_budget_s:
                return (f"compile budget of {self.cfg.compile_budget_s:g} s spent "
                        "(--compile-budget)")
            margin = self.cfg.compile_margin_s
            if budget is not None and budget - self.elapsed() < margin:
                return (f"under {margin:g} s of the time budget left for a compile "
                        "(--time-budget)")
        return None

    # -- one row -----------------------------------------------------------------------

    def unavailable_row(self, p: BenchPath, reason: str, work: Workload | None) -> None:
        row = self.base_row(p, None, None, work, status="unavailable", reason=reason)
        self.emit(row)
        self.log(f"{p.name}: unavailable: {reason}")

    def run_job(self, p: BenchPath, steps: int, batch: int, work: Workload) -> dict[str, Any]:
        na = p.supports(steps, batch)
        if na is not None:
            row = self.base_row(p, steps, batch, work, status="n/a", reason=na)
            self.emit(row)
            return row
        skip = self._skip_reason(p)
        if skip is not None:
            row = self.base_row(p, steps, batch, work, status="skipped", reason=skip)
            self.emit(row)
            return row
        row = self.base_row(p, steps, batch, work, status="ok")
        try:
            self._measure(p, steps, batch, work, row)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            row.update(status="error", reason=f"{type(e).__name__}: {first}")
            self.log(f"{p.name} steps={steps} batch={batch}: error: {row['reason']}")
        self.emit(row)
        if row["status"] == "ok":
            self.log(f"{p.name} steps={steps} batch={batch}: p50 {row['p50_ms']:.3f} ms, "
                     f"network {_fmt(row['network_ms'])} ms, {row['iterations']} iters")
        return row

    def _measure(self, p: BenchPath, steps: int, batch: int, work: Workload,
                 row: dict[str, Any]) -> None:
        state = self._state.setdefault(id(p), _PathState())
        timing = self.cfg.timing
        if self.reference is not None:
            self.reference.ensure(steps)  # before the memory baseline: not this row's memory
        torch_mem = p.memory == "torch" and p.device == "cuda"
        if torch_mem:
            import torch

            torch.cuda.reset_peak_memory_stats()
        mem_before = self.cuda.used_bytes() if p.device == "cuda" else None
        rss = host_memory_mb()
        if state.rss_base is None:
            state.rss_base = rss["rss"]

        load_s = p.load(steps, batch)
        key = p.load_key(steps)
        if load_s is not None:
            state.load_ms[key] = load_s * 1e3
        call = p.call(steps, batch)
        keep: dict[str, np.ndarray] = {}

        def e2e(i: int) -> np.ndarray:
            out = call(i)
            if i % SEEDS == 0:
                keep["images"] = out
            return out

        t0 = time.perf_counter()
        out = call(0)
        first_s = time.perf_counter() - t0
        p.verify(steps)
        if p.path in COMPILED:
            self.compile_spent += first_s
        self._check_images(out, work, batch)
        timed = time_calls(e2e, timing, deadline=self.deadline())
        s = timed.summary_ms()
        row.update(
            p50_ms=s["p50"], p90_ms=s["p90"], p99_ms=s["p99"], mean_ms=s["mean"],
            std_ms=s["std"], min_ms=s["min"], max_ms=s["max"],
            per_step_ms=s["p50"] / steps, images_per_s=batch / (s["p50"] / 1e3),
            iterations=int(s["n"]), warmup=len(timed.warmup_s),
            iterations_reduced=timed.reduced,
            clock="perf_counter+synchronize" if p.device == "cuda" else "perf_counter",
            noise_ms=self.noise_ms(work, batch),
            first_call_ms=first_s * 1e3,
        )
        load_ms = state.load_ms.get(key)
        row["load_ms"] = load_ms
        row["cold_start_ms"] = None if load_ms is None else load_ms + first_s * 1e3
        row["cold_start_fresh"] = load_s is not None
        self._parity(keep.get("images", out), batch, steps, row)

        fn, method = p.network(steps, batch)
        row["network_method"] = method
        if fn is not None:
            try:
                net = time_calls(fn, timing.for_network(),
                                 deadline=self.deadline()).summary_ms()
                row.update(network_ms=net["p50"], network_p90_ms=net["p90"])
                row["host_overhead_ms"] = s["p50"] - net["p50"]
                row["host_overhead_pct"] = 100.0 * row["host_overhead_ms"] / net["p50"]
            except Exception as e:
                row["notes"].append(f"network-only timing failed: {type(e).__name__}: {e}")

        if torch_mem:
            import torch

            row["device_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
            row["device_mem_method"] = ("torch.cuda.max_memory_allocated (peak of this row, "
                                        "weights included)")
        elif p.device == "cuda" and mem_before is not None:
            after = self.cuda.used_bytes()
            assert after is not None
            state.device_mem += after - mem_before
            row["device_mem_mb"] = state.device_mem / 2**20
            row["device_mem_method"] = (f"device-wide used memory added by this path "
                                        f"({self.cuda.method})")
        rss_after = host_memory_mb()
        row["host_rss_mb"] = rss_after["rss"]
        row["host_peak_rss_mb"] = rss_after["hwm"]
        if rss_after["rss"] is not None and state.rss_base is not None:
            row["host_rss_delta_mb"] = rss_after["rss"] - state.rss_base
        if self.roofline is not None:
            self.roofline.annotate(row)

    def _check_images(self, out: Any, work: Workload, batch: int) -> None:
        if work.meta.images:
            c, h, w = work.meta.image_shape
            dtype, shape = np.dtype(np.uint8), (batch, h, w, c)
        else:
            dtype, shape = np.dtype(np.float32), (batch, *work.meta.sample_shape)
        if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape:
            got = (getattr(out, "dtype", type(out).__name__), getattr(out, "shape", None))
            raise RuntimeError(f"the path returned {got}, not {dtype} {shape}")

    def _parity(self, images: np.ndarray, batch: int, steps: int,
                row: dict[str, Any]) -> None:
        if self.reference is None:
            row["parity_ref"] = "none: no reference"
            return
        ref, why = self.reference.images(steps, batch)
        if ref is None:
            row["parity_ref"] = f"none: {why}"
            return
        row["max_abs_err"], row["psnr_db"] = parity(images, ref)
        row["parity_ref"] = why

    # -- all rows ------------------------------------------------------------------------

    def run(self, paths: Sequence[tuple[BenchPath, Workload]]) -> None:
        jobs: list[tuple[tuple[int, ...], int, BenchPath, int, int, Workload]] = []
        for order, (p, work) in enumerate(paths):
            reason = p.unavailable()
            if reason is not None:
                self.unavailable_row(p, reason, work)
                continue
            for steps in self.cfg.steps:
                for batch in self.cfg.batches:
                    key = config_priority(steps, batch)
                    jobs.append(((key[0], order, key[1], key[2]), order, p, steps, batch, work))
        jobs.sort(key=lambda j: j[0])
        total = len(jobs)
        for n, (_, _, p, steps, batch, work) in enumerate(jobs, 1):
            if n == 1 or n % 10 == 0:
                self.log(f"[{n}/{total}] {self.elapsed():.0f} s elapsed")
            self.run_job(p, steps, batch, work)
        for p, _ in paths:
            p.close()


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def unique(values: Iterable[Any]) -> tuple[Any, ...]:
    return tuple(dict.fromkeys(values))


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
