"""The latency suite: timing, statistics, memory, the result row, fewstep's paths, the run.

Every configuration (path × steps × batch) becomes one result row (``ROW_FIELDS``).
How a row is measured (DESIGN rule 10, the device METHOD):

* **End to end**: one call = host noise (``noise.generation_noise``, inside the call)
  → images → (B, H, W, C) uint8 on the host. The call returns host memory, so it has
  synchronised with the device; ``time.perf_counter`` around each call
  (clock ``perf_counter+synchronize`` on a GPU, ``perf_counter`` on the CPU).
  ``warmup`` calls first (stopped early after ``warmup_seconds`` once 3 were made), then
  ``max(iters, target_seconds / call)`` timed calls, at most ``max_iters``; a call so
  slow that this exceeds ``max_config_seconds`` gets fewer (never below
  ``min_iters_floor``), and the row's ``iterations`` says how many (also fewer when the
  run's ``--time-budget`` runs out mid-configuration). Seeds rotate over
  ``SEEDS`` so the inputs change between calls; the images of the last timed call with
  seed 0 are compared with the PyTorch fp32 reference.
* **Network only**: the graph executions alone with inputs already on the device
  (``network_method`` in the row says exactly what was repeated). Host overhead =
  end-to-end p50 − network p50.
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

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from fewstep.runtime import artifact, backends, sampling
from fewstep.runtime import noise as host_noise
from fewstep.runtime.errors import ArtifactError
from fewstep.runtime.meta import ModelMeta

FEWSTEP_BACKENDS: Final = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
GRAPH_KINDS: Final = ("denoiser", "step", "sampler")
BASELINES: Final = ("torch-eager", "torch-compile", "ort-steps")
DEFAULT_STEPS: Final = (1, 2, 4, 8, 20, 50)
DEFAULT_BATCHES: Final = (1, 4, 16, 64)
SEEDS: Final = 4              # timed calls rotate over seeds 0..SEEDS-1
PSNR_IDENTICAL: Final = 100.0  # PSNR reported for bit-identical images
MIN_WARMUP_CALLS: Final = 3
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
    one call and the timing after one sample, and the result is marked ``reduced``.
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
        if late() and i + 1 < n:
            reduced = True
            break
    return Timed(samples, warm, reduced)


# ---------------------------------------------------------------------------------
# Memory and device synchronisation
# ---------------------------------------------------------------------------------


def host_memory_mb(status: Path = Path("/proc/self/status")) -> dict[str, float | None]:
    """{"rss": VmRSS, "hwm": VmHWM (the process's peak RSS)} in MiB; None off Linux."""
    out: dict[str, float | None] = {"rss": None, "hwm": None}
    try:
        text = status.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key in ("VmRSS", "VmHWM") and parts and parts[0].isdigit():
            out["rss" if key == "VmRSS" else "hwm"] = int(parts[0]) / 1024.0
    return out


class Cuda:
    """cudaMemGetInfo and cudaDeviceSynchronize through whatever is importable.

    Tried in order: cuda-python, CuPy, PyTorch, ctypes libcudart. ``method`` names the
    one in use, or why none is (then ``used_bytes`` and ``synchronize`` do nothing).
    """

    def __init__(self, probe: bool = True) -> None:
        self._mem: Callable[[], tuple[int, int]] | None = None
        self._sync: Callable[[], None] | None = None
        self.method = "no CUDA API importable (cuda-python, cupy, torch, libcudart)"
        if not probe:
            self.method = "not probed: no GPU backend or torch CUDA in this run"
            return
        for name, attempt in (("cuda-python", self._cuda_python), ("cupy", self._cupy),
                              ("torch.cuda", self._torch), ("ctypes libcudart", self._ctypes)):
            try:
                mem, sync = attempt()
                mem()
            except Exception:
                continue
            self._mem, self._sync, self.method = mem, sync, f"cudaMemGetInfo via {name}"
            break

    @property
    def available(self) -> bool:
        return self._mem is not None

    def used_bytes(self) -> int | None:
        if self._mem is None:
            return None
        free, total = self._mem()
        return int(total - free)

    def synchronize(self) -> None:
        if self._sync is not None:
            self._sync()

    @staticmethod
    def _cuda_python() -> tuple[Callable[[], tuple[int, int]], Callable[[], None]]:
        from fewstep.runtime.backends.tensorrt import cuda_check, import_cudart

        cudart = import_cudart()

        def mem() -> tuple[int, int]:
            free, total = cuda_check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
            return int(free), int(total)

        def sync() -> None:
            cuda_check(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

        return mem, sync

    @staticmethod
    def _cupy() -> tuple[Callable[[], tuple[int, int]], Callable[[], None]]:
        import cupy

        rt = cupy.cuda.runtime
        return (lambda: tuple(int(v) for v in rt.memGetInfo())), rt.deviceSynchronize  # type: ignore[return-value]

    @staticmethod
    def _torch() -> tuple[Callable[[], tuple[int, int]], Callable[[], None]]:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA in torch")
        return (lambda: tuple(int(v) for v in torch.cuda.mem_get_info())), torch.cuda.synchronize  # type: ignore[return-value]

    @staticmethod
    def _ctypes() -> tuple[Callable[[], tuple[int, int]], Callable[[], None]]:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("cudart")
        candidates = [name] if name else []
        candidates += [f"libcudart.so.{v}" for v in (13, 12, 11)] + ["libcudart.so"]
        lib = None
        for cand in candidates:
            with contextlib.suppress(OSError):
                lib = ctypes.CDLL(cand)
                break
        if lib is None:
            raise OSError("libcudart not found")

        def mem() -> tuple[int, int]:
            free, total = ctypes.c_size_t(), ctypes.c_size_t()
            err = lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
            if err:
                raise RuntimeError(f"cudaMemGetInfo returned {err}")
            return int(free.value), int(total.value)

        def sync() -> None:
            err = lib.cudaDeviceSynchronize()
            if err:
                raise RuntimeError(f"cudaDeviceSynchronize returned {err}")

        return mem, sync


# ---------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------


def parity(images: np.ndarray, ref: np.ndarray) -> tuple[int, float]:
    """(max |a - b|, PSNR in dB) of two uint8 image batches; PSNR_IDENTICAL if equal."""
    if images.shape != ref.shape:
        raise ValueError(f"images {images.shape} vs reference {ref.shape}")
    diff = images.astype(np.int32) - ref.astype(np.int32)
    mse = float(np.mean(diff.astype(np.float64) ** 2))
    psnr = PSNR_IDENTICAL if mse == 0 else min(PSNR_IDENTICAL, 10 * math.log10(255.0**2 / mse))
    return int(np.abs(diff).max()), psnr


# ---------------------------------------------------------------------------------
# What every benchmarked path provides
# ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """What every path generates: the model, sampler settings, labels, guidance."""

    meta: ModelMeta
    spacing: str
    guidance: float | None
    eta: float = 0.0

    def plan(self, steps: int) -> sampling.SamplingPlan:
        return sampling.SamplingPlan.create(self.meta, steps, self.spacing, self.eta)

    def labels(self, n: int) -> np.ndarray | None:
        return sampling.resolve_labels(self.meta, n, None)  # type: ignore[no-any-return]

    def noise(self, seed: int, n: int) -> np.ndarray:
        x_T, _ = host_noise.generation_noise(seed, range(n), self.meta.image_shape, 0)
        return x_T


class BenchPath:
    """One thing to time (a fewstep graph on a backend, or a baseline)."""

    name = ""
    family = "fewstep"     # or "baseline"
    path = ""              # "fewstep", "torch-eager", "torch-compile", "ort-steps"
    backend = ""
    graph: str | None = None
    mode: str | None = None
    precision = "fp32"
    device = "cpu"         # "cpu" or "cuda"
    model = ""
    memory = "device-wide"  # or "torch"

    def unavailable(self) -> str | None:
        """Why this path cannot run at all here (one 'unavailable' row), or None."""
        return None

    def supports(self, steps: int, batch: int) -> str | None:
        """Why this configuration does not exist (an 'n/a' row), or None."""
        return None

    def load(self, steps: int, batch: int) -> float | None:
        """Load what (steps, batch) needs; seconds spent, or None if already loaded."""
        return None

    def load_key(self, steps: int) -> Any:
        """Which loaded object (steps, batch) uses: its load time is the row's load_ms."""
        return None

    def call(self, steps: int, batch: int) -> Callable[[int], np.ndarray]:
        """The end-to-end call: i → (batch, H, W, C) uint8 on the host (seed i % SEEDS)."""
        raise NotImplementedError

    def verify(self, steps: int) -> None:
        """After the first call: raise if the path did not run what its name says."""
        return None

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        """(network-only call, how it is measured) or (None, why not)."""
        return None, "not measured for this path"

    def close(self) -> None:
        return None


# ---------------------------------------------------------------------------------
# fewstep's own paths: a Pipeline forced onto one graph kind
# ---------------------------------------------------------------------------------


@dataclass
class Artifact:
    """The graph files of one exported model (``--model``), by kind and file type."""

    path: Path
    meta: ModelMeta
    label: str  # "fp32", or "fp32 [stem]" where two artifacts share a precision
    files: dict[str, list[tuple[Path, ModelMeta]]] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return self.meta.graph.precision

    def graphs(self, kind: str, ext: str) -> list[tuple[Path, ModelMeta]]:
        return [(p, m) for p, m in self.files.get(ext, []) if m.graph.kind == kind]

    def denoiser_onnx(self) -> Path | None:
        found = self.graphs("denoiser", ".onnx")
        return found[0][0] if found else None


def discover(model: Path) -> Artifact:
    """Every graph (ONNX and TensorRT plans) of the artifact ``model`` belongs to."""
    if not model.is_file():
        raise ArtifactError(
            f"model file {str(model)!r} does not exist; pass --model PATH to a model.onnx "
            "made by `fewstep export`"
        )
    ext = ".plan" if model.name.endswith(".plan") else ".onnx"
    if ext == ".onnx" and not model.name.endswith(".onnx"):
        raise ArtifactError(
            f"--model {str(model)!r} is neither a .onnx nor a .plan file; pass a model.onnx "
            "made by `fewstep export`"
        )
    stem = artifact.base_stem(model, ext)
    files: dict[str, list[tuple[Path, ModelMeta]]] = {}
    for e in (".onnx", ".plan"):
        found = []
        for f in artifact.siblings(model.parent / f"{stem}{e}", e):
            if not f.is_file():
                continue
            try:
                if e == ".onnx":
                    meta = artifact.read_onnx_meta(f)
                else:
                    from fewstep.runtime.plan import load_sidecar

                    meta = load_sidecar(f).meta
            except (ArtifactError, ValueError, OSError) as err:
                if f == model:
                    raise
                warnings.warn(f"ignoring {f}: {err}", stacklevel=2)
                continue
            found.append((f, meta))
        files[e] = found
    main = next((m for p, m in files[ext] if p == model), None)
    assert main is not None
    return Artifact(model, main, main.graph.precision, files)


def check_same_model(arts: Sequence[Artifact]) -> None:
    a = arts[0].meta
    for other in arts[1:]:
        b = other.meta
        for what, x, y in (("source_hash", a.source_hash, b.source_hash),
                           ("image shape", a.image_shape, b.image_shape),
                           ("schedule", a.schedule, b.schedule),
                           ("prediction type", a.prediction_type, b.prediction_type),
                           ("classes", a.num_classes, b.num_classes)):
            if x != y:
                raise ArtifactError(
                    f"--model {other.path} is another model than {arts[0].path}: its {what} "
                    f"differs ({y!r} vs {x!r}); pass artifacts exported from one checkpoint"
                )


def label_artifacts(arts: Sequence[Artifact]) -> None:
    """Precision as the label; add the file stem where two artifacts share a precision."""
    for a in arts:
        twins = [b for b in arts if b.precision == a.precision]
        a.label = a.precision if len(twins) == 1 else f"{a.precision} [{a.path.stem}]"


class FewstepPath(BenchPath):
    """``Pipeline.from_graphs`` over one graph of one kind: the graph choice is forced."""

    family = "fewstep"
    path = "fewstep"

    def __init__(self, art: Artifact, backend: str, kind: str, work: Workload,
                 cuda: Cuda | None, options: dict[str, Any]) -> None:
        self.art, self.backend, self.graph, self.work = art, backend, kind, work
        self.kind = kind
        self.name = f"fewstep {backend} {kind} {art.label}"
        self.precision = art.precision
        self.device = "cpu" if backend == "ort-cpu" else "cuda"
        self.ext = ".plan" if backend == "tensorrt" else ".onnx"
        self.files = art.graphs(kind, self.ext)
        self.model = str(self.files[0][0]) if self.files else str(art.path)
        self.cuda = cuda
        self.options = options
        self._pipes: dict[Path, Any] = {}
        self._times = "1" if kind == "sampler" else "steps"  # launches, in method texts

    def unavailable(self) -> str | None:
        reason = backends.availability().get(self.backend)
        if reason:
            return reason
        if not self.files:
            what = "TensorRT plan" if self.ext == ".plan" else "ONNX graph"
            fix = ("build it with `fewstep build`" if self.ext == ".plan"
                   else f"export it with `fewstep export --fused {self.kind}`"
                   if self.kind != "denoiser" else "re-export the model")
            return f"{self.art.path.name} has no {self.kind} {what}; {fix}"
        if self.work.guidance is not None and not self.files[0][1].graph.guidance:
            return (f"the {self.kind} graph was exported without --guidance but the benchmark "
                    f"uses guidance={self.work.guidance}")
        return None

    def _file(self, steps: int) -> Path | None:
        if self.kind != "sampler":
            return self.files[0][0]
        for p, m in self.files:
            g = m.graph
            if g.steps == steps and g.spacing == self.work.spacing and abs(g.eta) < 1e-12:
                return p
        return None

    def supports(self, steps: int, batch: int) -> str | None:
        if self._file(steps) is None:
            have = sorted({m.graph.steps for _, m in self.files})
            return (f"no sampler graph for {steps} steps (the artifact has one for "
                    f"{', '.join(map(str, have)) or 'none'})")
        return None

    def load(self, steps: int, batch: int) -> float | None:
        file = self._file(steps)
        assert file is not None
        if file in self._pipes:
            return None
        from fewstep.runtime.pipeline import Pipeline

        t0 = time.perf_counter()
        graph = backends.load(str(file), self.backend, **self.options)
        self._pipes[file] = Pipeline.from_graphs([graph])
        return time.perf_counter() - t0

    def _pipe(self, steps: int) -> Any:
        file = self._file(steps)
        assert file is not None
        return self._pipes[file]

    def call(self, steps: int, batch: int) -> Callable[[int], np.ndarray]:
        pipe = self._pipe(steps)
        g = self.work.guidance
        spacing = self.work.spacing

        def run(i: int) -> np.ndarray:
            out: np.ndarray = pipe.generate(batch, steps, seed=i % SEEDS, guidance=g,
                                            spacing=spacing, batch_size=batch)
            return out

        return run

    def load_key(self, steps: int) -> Any:
        return self._file(steps)

    def verify(self, steps: int) -> None:
        info = self._pipe(steps).last_info
        took = None if info is None else info.path
        if took != self.kind:
            raise RuntimeError(f"the pipeline ran its {took} path, not {self.kind}")

    def host_feeds(self, steps: int, batch: int) -> dict[str, np.ndarray]:
        """Real inputs of the graph at step 0 (x = seed-0 noise), like the pipeline's."""
        meta = self._pipe(steps).graphs[0].meta
        plan = self.work.plan(steps)
        x = self.work.noise(0, batch)
        values: dict[str, np.ndarray] = {
            "x": x,
            "t": np.full(batch, plan.timesteps[0], np.float32),
            "a_t": np.full(batch, plan.a_t[0], np.float32),
            "a_prev": np.full(batch, plan.a_prev[0], np.float32),
            "eta": np.full(batch, plan.eta, np.float32),
            "noise": np.zeros_like(x),
            "guidance": np.full(batch, 1.0 if self.work.guidance is None
                                else self.work.guidance, np.float32),
        }
        labels = self.work.labels(batch)
        if labels is not None:
            values["label"] = labels.astype(np.int64)
        return {name: values[name] for name in meta.graph.inputs}

    def network(self, steps: int, batch: int) -> tuple[Callable[[int], Any] | None, str]:
        graph = self._pipe(steps).graphs[0]
        launches = 1 if self.kind == "sampler" else steps
        try:
            if hasattr(graph, "_session"):
                return self._ort_network(graph, steps, batch, launches)
            if hasattr(graph, "_enqueue"):
                return self._trt_network(graph, batch, launches)
        except Exception as e:  # internals changed: say so, do not guess
            return None, f"network-only timing failed ({type(e).__name__}: {e})"
        return None, f"network-only timing is not implemented for {type(graph).__name__}"

    def _ort_network(self, graph: Any, steps: int, batch: int,
                     launches: int) -> tuple[Callable[[int], Any] | None, str]:
        if graph.config.io_binding:
            if self.cuda is None or not self.cuda.available:
                return None, "no CUDA API to synchronise the device (see env cuda_api)"
            buffers = graph._allocate(batch)  # the pipeline's own device buffers/bindings
            ping_pong = self.kind == "step"
            cuda = self.cuda

            def run(_: int) -> None:
                for i in range(launches):
                    graph._launch(buffers, i % 2 if ping_pong else 0)
                cuda.synchronize()

            what = "CUDA graph replays" if graph.cuda_graph else "runs"
            return run, (f"{self._times} × run_with_iobinding ({what}) on the pipeline's device "
                         "OrtValues, then cudaDeviceSynchronize")
        session, out = graph._session, [graph.output.name]
        feeds = self.host_feeds(steps, batch)

        def run_host(_: int) -> None:
            for _i in range(launches):
                session.run(out, feeds)

        return run_host, f"{self._times} × InferenceSession.run on prepared host arrays"

    def _trt_network(self, graph: Any, batch: int,
                     launches: int) -> tuple[Callable[[int], Any] | None, str]:
        ctx = graph._context
        graph._set_batch(ctx, batch)
        graph._bind(ctx)

        def run(_: int) -> None:
            for _i in range(launches):
                graph._enqueue(ctx)
            graph._sync()

        return run, (f"{self._times} × execute_async_v3 on the plan's device buffers, then "
                     "cudaStreamSynchronize")

    def close(self) -> None:
        for pipe in self._pipes.values():
            for g in pipe.graphs:
                closer = getattr(g, "close", None)
                if callable(closer):
                    with contextlib.suppress(Exception):
                        closer()
        self._pipes.clear()


# ---------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteConfig:
    models: tuple[Path, ...]
    checkpoint: Path | None = None
    backends: tuple[str, ...] = FEWSTEP_BACKENDS
    graphs: tuple[str, ...] = GRAPH_KINDS
    steps: tuple[int, ...] = DEFAULT_STEPS
    batches: tuple[int, ...] = DEFAULT_BATCHES
    baselines: tuple[str, ...] = BASELINES
    compile_modes: tuple[str, ...] = ("reduce-overhead",)
    compile_steps: tuple[int, ...] = (1, 2, 4, 8)
    compile_batches: tuple[int, ...] = (1, 4)
    compile_budget_s: float = 240.0
    guidance: float | None = 2.0
    seed: int = 0
    threads: int | None = None
    torch_threads: int | None = None
    timing: TimingConfig = TimingConfig()
    time_budget_s: float | None = None
    roofline: bool = True
    ceilings: bool = True
    quick: bool = False
    command: str = ""


def config_priority(steps: int, batch: int) -> tuple[int, int, int]:
    """Order of configurations (tier, batch, steps). Tier 0 is batch 1 at 4 steps (issue
    5's figures), then 1, 2 and 8 steps at batch 1 and 4 steps at batch 4, then the rest
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
        if p.path == "torch-compile":
            if self.compile_spent > self.cfg.compile_budget_s:
                return (f"compile budget of {self.cfg.compile_budget_s:g} s spent "
                        "(--compile-budget)")
            if budget is not None and budget - self.elapsed() < COMPILE_MARGIN_S:
                return (f"under {COMPILE_MARGIN_S} s of the time budget left for a compile "
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
        if p.path == "torch-compile":
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
        c, h, w = work.meta.image_shape
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8 or out.shape != (
            batch, h, w, c
        ):
            got = (getattr(out, "dtype", type(out).__name__), getattr(out, "shape", None))
            raise RuntimeError(f"the path returned {got}, not uint8 ({batch}, {h}, {w}, {c})")

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
