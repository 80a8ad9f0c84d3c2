"""ONNX Runtime backend: ``ort-cpu``, ``ort-cuda`` and ``ort-tensorrt``.

Opening a graph reads its ModelMeta (``artifact.read_onnx_meta``), creates an
``InferenceSession`` and then checks the session against the metadata: input and
output names, dtypes (float32 everywhere, int64 ``label``, uint8 ``image``) and every
non-batch dimension. A disagreement is an ``ArtifactError``, never a guess.

CPU (``ort-cpu``): graph optimisation level ALL, ``intra_op_num_threads`` =
``os.cpu_count()`` unless ``threads=`` says otherwise; ``run_loop`` is the host loop.

CUDA (``ort-cuda``, the fast path: state stays on the GPU): IO binding. For every batch size
the graph sees, its inputs and its output live in device ``OrtValue`` buffers that
are allocated once and reused; host arrays are copied in with
``OrtValue.update_inplace``. A step graph's ``run_loop`` ping-pongs x between two
device buffers (the output of step i is bound as the input x of step i+1), copies
only the small per-step inputs (t, a_t, a_prev, and the noise when given per step),
and brings only the final x back. CUDA graphs (provider option
``enable_cuda_graph``) replay every (batch size, ping-pong direction) binding from
its own captured graph, told apart by the run option ``gpu_graph_id`` (ONNX Runtime
>= 1.18; older versions capture one graph per session, so they run without). If a
session cannot use CUDA graphs (some node not on the CUDA EP, or capture fails) the
graph warns once (``cuda.warn_no_cuda_graph``, as every backend does) and runs without
them; ``cuda_graph=False`` turns them off.
An ORT-CUDA variant graph also gets ``fuse_conv_bias=1`` by default
(``ort_options.fuse_conv_bias_default``); if a session fails to open or a run fails with
it, the graph warns once and drops it first, then CUDA graphs, then reports the error.

TensorRT (``ort-tensorrt``): engine and timing caches in ``cache_dir`` (default
``<model folder>/.fewstep-cache/ort-trt/``), an optimisation profile for batch sizes
1..``max_batch``, fp16 only when the graph is fp32 and ``fp16=True`` is asked (an fp16
export already carries its precision). IO binding as for CUDA, without CUDA graphs
(the TensorRT EP keeps one graph per session, no ``gpu_graph_id``).

Jetson (``jetson.is_jetson()``): the GPU shares the board's memory with the CPU, so
the CUDA arena grows by exactly what is requested (``arena_extend_strategy`` =
``kSameAsRequested``, not the default power-of-two growth that can claim twice the
need) and is capped at half the physical memory unless ``gpu_mem_limit=`` is given
(ONNX Runtime's arena never returns memory, and the CPU side needs the rest);
cuDNN picks convolution algorithms heuristically instead of the exhaustive search,
whose workspace trials are slow there and allocate large temporary buffers.

Every backend: ``graph_optimization_level`` (default ``all``) and ``execution_mode``
(default ``sequential``) set the session options; ``optimized_cache`` (CPU, CUDA) saves
the optimised graph once and loads it afterwards (``ort_cache.py``; ``describe()`` says
``hit``, ``written``, ``rebuilt (why)`` or ``off``); ``warmup_batch=B`` runs the graph
once on zeros at batch B when it is opened, so allocation, cuDNN's algorithm search and
the CUDA graph capture happen at load instead of in the first call. Sessions are made in
``ort_session.py``.

Thread safety: ``InferenceSession.run`` is thread-safe; the device buffers, bindings
and CUDA graphs are not, so each graph serialises its bound runs with a lock.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, NoReturn, TypeVar

import numpy as np

from ..artifact import read_onnx_meta
from ..errors import ArtifactError, BackendUnavailable
from ..meta import ModelMeta, TensorSpec
from . import Array, Feeds, NetworkRun, check_launches, host_loop
from .cuda import warn_no_cuda_graph
from .ort_options import OrtConfig, fuse_conv_bias_default, make_config
from .ort_session import ORT_TYPES, create_session, verify_session

PROVIDERS: Final = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-tensorrt": "TensorrtExecutionProvider",
}
CUDA_GRAPH_IDS_SINCE: Final = (1, 18)  # the run option "gpu_graph_id"
SMALL_INPUT: Final = 4096  # elements: inputs this small are compared before uploading
__all__ = ["ORT_TYPES", "OrtGraph", "open_graph", "unavailable_reason", "verify_session"]


def _import_ort() -> Any:
    import onnxruntime

    return onnxruntime


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def installed_version() -> tuple[int, ...]:
    """The installed onnxruntime's version as numbers, e.g. (1, 31, 1)."""
    return _version(_import_ort().__version__)


def _tensorrt_libs_present() -> bool:
    import ctypes.util
    import importlib.util

    if importlib.util.find_spec("tensorrt_libs") or importlib.util.find_spec("tensorrt"):
        return True
    return ctypes.util.find_library("nvinfer") is not None


def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` can run here, else why not and what to install."""
    if name not in PROVIDERS:
        return f"{name!r} is not an ONNX Runtime backend; use one of {', '.join(PROVIDERS)}"
    try:
        ort = _import_ort()
    except ImportError as e:
        return (f"onnxruntime cannot be imported ({e}); pip install onnxruntime "
                "(CPU) or onnxruntime-gpu (NVIDIA; on Jetson the JetPack wheel)")
    available = list(ort.get_available_providers())
    provider = PROVIDERS[name]
    tensorrt_hint = ("; the TensorRT EP also needs the TensorRT libraries (libnvinfer, "
                     "e.g. pip install tensorrt, or JetPack's) on the library path")
    if provider not in available:
        hint = ("install onnxruntime-gpu (on Jetson: the onnxruntime-gpu wheel built for "
                "your JetPack) with matching CUDA and cuDNN libraries")
        return (f"onnxruntime {ort.__version__} has no {provider} (it has "
                f"{', '.join(available)}); {hint}"
                + (tensorrt_hint if name == "ort-tensorrt" else ""))
    if name == "ort-tensorrt" and not _tensorrt_libs_present():
        return f"{provider} is built in, but no TensorRT library was found" + tensorrt_hint
    return None


# ---------------------------------------------------------------------------------
# The graph
# ---------------------------------------------------------------------------------


class _CaptureFailed(Exception):
    """A bound run failed and the graph fell back (fewstep's default fuse_conv_bias off,
    else CUDA graphs off): run it again."""


FALLBACKS: Final = 2  # fuse_conv_bias off, then CUDA graphs off
_T = TypeVar("_T")


def _retrying(run: Callable[[], _T]) -> _T:
    """``run()``, again after each fallback a failed bound run took (at most FALLBACKS;
    with none left, ``_launch`` raises the run's own error)."""
    for _ in range(FALLBACKS):
        try:
            return run()
        except _CaptureFailed:
            continue
    return run()


@dataclass
class _Buffers:
    """Device buffers of one batch size, and their bindings (two for a step graph)."""

    values: dict[str, Any]          # input name -> OrtValue
    out: Any                        # OrtValue of the output
    bound: list[tuple[Any, Any]]    # [(IOBinding, RunOptions)]: x→out, and out→x
    # What the small inputs (labels, guidance, ...) of the last bound run held, so an
    # unchanged one is not copied to the device again.
    last: dict[str, Array] = field(default_factory=dict)

    def upload(self, name: str, arr: Array) -> None:
        """Copy ``arr`` into the device buffer ``name`` unless it already holds it."""
        small = name != "x" and arr.size <= SMALL_INPUT
        prev = self.last.get(name) if small else None
        if prev is not None and np.array_equal(prev, arr):
            return
        self.values[name].update_inplace(arr)
        if small:
            self.last[name] = arr.copy()
        else:
            self.last.pop(name, None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


class OrtGraph:
    """One ONNX file in an ONNX Runtime session; see the module docstring."""

    def __init__(self, path: str, meta: ModelMeta, config: OrtConfig) -> None:
        self.path = path
        self.meta = meta
        self.backend = config.backend
        self.config = config
        self.max_batch: int | None = config.max_batch
        self.inputs, self.output = meta.io.inputs, meta.io.output
        self._lock = threading.Lock()
        self._buffers: dict[int, _Buffers] = {}
        self._next_graph_id = 1
        self._device = "cpu" if config.backend == "ort-cpu" else "cuda"
        self.cuda_graph = config.cuda_graph and self._cuda_graph_supported()
        # cuDNN's fused convolution + bias on a variant graph (ort_options); dropped, with
        # one warning, if a session with it fails to open or to run.
        self.fuse_conv_bias = fuse_conv_bias_default(meta, config, installed_version())
        self.cache_state = "off"  # what the optimised-graph cache did (ort_cache)
        self._session = self._open_session()
        if config.warmup_batch is not None:
            self.warm_up(config.warmup_batch)

    def __repr__(self) -> str:
        return f"OrtGraph({self.meta.graph.kind}, {self.path!r}, {self.backend})"

    # -- session --------------------------------------------------------------------

    def _cuda_graph_supported(self) -> bool:
        version = _import_ort().__version__
        if _version(version) < CUDA_GRAPH_IDS_SINCE:
            warn_no_cuda_graph(self.path, f"onnxruntime {version} captures one CUDA graph per "
                               "session; gpu_graph_id needs >= 1.18", stacklevel=4)
            return False
        return True

    def _new_session(self, cuda_graph: bool) -> Any:
        if self.config.backend == "ort-tensorrt":
            try:
                Path(self.config.cache_dir).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ValueError(
                    f"cannot create the TensorRT cache folder {self.config.cache_dir!r} "
                    f"({e.strerror}); pass cache_dir= a writable folder"
                ) from None
        session, self.cache_state = create_session(_import_ort(), self.path, self.meta,
                                                   self.config, cuda_graph, self.fuse_conv_bias)
        return session

    def _open_session(self) -> Any:
        try:
            session = self._new_session(self.cuda_graph)
        except ValueError:
            raise
        except Exception as e:  # onnxruntime's exceptions derive from Exception only
            if self.fuse_conv_bias:
                self._drop_fused_bias(e)
                return self._open_session()
            if not self.cuda_graph:
                gpu = "" if self.backend == "ort-cpu" else (
                    f" (if --backend ort-cpu loads it, {PROVIDERS[self.backend]} itself failed: "
                    "check the CUDA/cuDNN/TensorRT installation)")
                raise ArtifactError(
                    f"onnxruntime cannot load {self.path!r} ({_first_line(e)}); the file is "
                    "damaged or uses operators this onnxruntime lacks: re-export it or "
                    f"upgrade onnxruntime{gpu}"
                ) from None
            self._warn_no_cuda_graph(e)
            return self._open_session()
        wanted = PROVIDERS[self.backend]
        active = list(session.get_providers())
        if wanted not in active:
            raise BackendUnavailable(
                f"onnxruntime could not start {wanted} for {self.path!r} (it fell back to "
                f"{', '.join(active)}); check the CUDA/cuDNN"
                + ("/TensorRT" if self.backend == "ort-tensorrt" else "")
                + " libraries, or pass --backend ort-cpu"
            )
        verify_session(session, self.meta, self.path)
        return session

    def _drop_fused_bias(self, e: BaseException) -> None:
        """fewstep's default ``fuse_conv_bias`` failed here: warn once, go on without it."""
        warnings.warn(
            f"{Path(self.path).name}: cuDNN's fused convolution + bias (the CUDA EP option "
            f"fuse_conv_bias, on by default for ORT-CUDA variant graphs) failed "
            f"({_first_line(e)}); running without it, which is slower; pass "
            "cuda_options={'fuse_conv_bias': '0'} to skip the attempt",
            RuntimeWarning, stacklevel=5)
        self.fuse_conv_bias = False
        self._buffers.clear()

    def _warn_no_cuda_graph(self, e: BaseException) -> None:
        warn_no_cuda_graph(self.path, e, stacklevel=5)
        self.cuda_graph = False
        self._buffers.clear()

    @property
    def providers(self) -> list[str]:
        return list(self._session.get_providers())

    def describe(self) -> dict[str, Any]:
        return {"providers": self.providers, "io_binding": self.config.io_binding,
                "cuda_graph": self.cuda_graph, "threads": self.config.threads,
                "max_batch": self.max_batch, "optimized_cache": self.cache_state,
                "graph_optimization_level": self.config.graph_optimization_level,
                "execution_mode": self.config.execution_mode,
                "warmup_batch": self.config.warmup_batch,
                "fuse_conv_bias": self.fuse_conv_bias}

    def warm_up(self, batch: int) -> None:
        """Run once on zeros at ``batch`` (both ping-pong directions of a step graph): the
        buffers, cuDNN's algorithm choice and the CUDA graphs are made now, not in the
        first real call."""
        zeros = {n: np.zeros((batch, *spec.dims), spec.dtype) for n, spec in self.inputs.items()}
        if not self.config.io_binding:
            self._session.run([self.output.name], zeros)
            return
        directions = 2 if self.meta.graph.kind == "step" else 1

        def warm() -> None:
            buffers = self._allocate(batch)
            for name, arr in zeros.items():
                buffers.upload(name, arr)
            for parity in range(directions):
                self._launch(buffers, parity)
            buffers.bound[0][0].synchronize_outputs()

        with self._lock:
            _retrying(warm)

    # -- feeds ----------------------------------------------------------------------

    def _cast(self, name: str, value: Any, batch: int | None) -> Array:
        spec = self.inputs[name]
        arr = np.ascontiguousarray(value, dtype=spec.dtype)
        if arr.ndim != 1 + len(spec.dims) or arr.shape[1:] != spec.dims or (
            batch is not None and arr.shape[0] != batch
        ):
            want = ", ".join([str(batch) if batch is not None else "B", *map(str, spec.dims)])
            raise ValueError(
                f"input {name!r} has shape {tuple(arr.shape)}; {Path(self.path).name} takes "
                f"({want})"
            )
        return arr

    def _feeds(self, feeds: Feeds, names: Sequence[str], batch: int | None) -> dict[str, Array]:
        if set(feeds) != set(names):
            raise ValueError(
                f"feeds {sorted(feeds)} do not match {Path(self.path).name}; pass exactly "
                f"{sorted(names)}"
            )
        return {name: self._cast(name, value, batch) for name, value in feeds.items()}

    # -- running --------------------------------------------------------------------

    def run(self, feeds: Feeds) -> Array:
        if "x" not in feeds:
            raise ValueError(f"feeds {sorted(feeds)} lack 'x'; pass {list(self.meta.graph.inputs)}")
        batch = int(np.shape(feeds["x"])[0]) if np.ndim(feeds["x"]) else None
        arrays = self._feeds(feeds, list(self.inputs), batch)
        if not self.config.io_binding:
            def unbound() -> Array:
                try:
                    out: Array = self._session.run([self.output.name], arrays)[0]
                except Exception as e:
                    self._fall_back(e, cuda_graphs=False)
                return out

            return _retrying(unbound)
        assert batch is not None
        with self._lock:
            return _retrying(lambda: self._bound_run(batch, arrays))

    def network_run(self, feeds: Feeds, launches: int = 1) -> NetworkRun:
        """The session alone on ``feeds``: see ``backends.Graph.network_run``."""
        check_launches(launches)
        if "x" not in feeds:
            raise ValueError(f"feeds {sorted(feeds)} lack 'x'; pass {list(self.meta.graph.inputs)}")
        batch = int(np.shape(feeds["x"])[0]) if np.ndim(feeds["x"]) else None
        arrays = self._feeds(feeds, list(self.inputs), batch)
        if not self.config.io_binding:
            names = [self.output.name]

            def host() -> None:
                for _ in range(launches):
                    self._session.run(names, arrays)

            return NetworkRun(host, f"{launches} × InferenceSession.run on prepared host arrays")
        assert batch is not None
        parities = [i % 2 if self.meta.graph.kind == "step" else 0 for i in range(launches)]

        def ready() -> _Buffers:
            buffers = self._buffers.get(batch)
            if buffers is None:  # first use, or dropped when CUDA graphs were turned off
                buffers = self._allocate(batch)
                for name, arr in arrays.items():
                    buffers.upload(name, arr)
            return buffers

        def launch() -> None:
            buffers = ready()
            for parity in parities:
                self._launch(buffers, parity)
            buffers.bound[0][0].synchronize_outputs()

        def bound() -> None:
            with self._lock:
                _retrying(launch)

        with self._lock:
            buffers = ready()
            for name, arr in arrays.items():
                buffers.upload(name, arr)
        what = "CUDA graph replays" if self.cuda_graph else "runs"
        return NetworkRun(bound, f"{launches} × run_with_iobinding ({what}) on the graph's "
                                 "device OrtValues, then IOBinding.synchronize_outputs")

    def run_loop(self, x: Array, fixed: Feeds, per_step: Sequence[Feeds]) -> Array:
        if self.meta.graph.kind != "step":
            raise ValueError(
                f"run_loop needs a step graph; {Path(self.path).name} is a "
                f"{self.meta.graph.kind} graph"
            )
        if not per_step:  # nothing to run: x is the result
            return np.array(self._cast("x", x, None), copy=True)
        step_names = set(per_step[0])
        if any(set(f) != step_names for f in per_step) or step_names & set(fixed) or (
            "x" in step_names | set(fixed)
        ) or step_names | set(fixed) | {"x"} != set(self.inputs):
            raise ValueError(
                f"run_loop feeds: fixed {sorted(fixed)} and per-step {sorted(step_names)} must "
                f"split {sorted(set(self.inputs) - {'x'})} between them, the same keys each step"
            )
        x0 = self._cast("x", x, None)
        batch = x0.shape[0]
        if not self.config.io_binding:
            return host_loop(self, x0, fixed, per_step)
        fixed_arrays = {n: self._cast(n, v, batch) for n, v in fixed.items()}
        steps = [{n: self._cast(n, v, batch) for n, v in f.items()} for f in per_step]
        with self._lock:
            return _retrying(lambda: self._bound_loop(x0, fixed_arrays, steps))

    # -- IO binding (device-resident buffers) -----------------------------------------

    def _allocate(self, batch: int) -> _Buffers:
        buffers = self._buffers.get(batch)
        if buffers is not None:
            return buffers
        ort = _import_ort()

        def value(spec: TensorSpec) -> Any:
            return ort.OrtValue.ortvalue_from_shape_and_type(
                [batch, *spec.dims], spec.dtype, self._device, self.config.device_id
            )

        values = {name: value(spec) for name, spec in self.inputs.items()}
        out = value(self.output)
        directions = 2 if self.meta.graph.kind == "step" else 1
        bound = []
        for parity in range(directions):
            binding = self._session.io_binding()
            for name, v in values.items():
                binding.bind_ortvalue_input(name, out if (parity and name == "x") else v)
            binding.bind_ortvalue_output(self.output.name, values["x"] if parity else out)
            options = ort.RunOptions()
            if self.cuda_graph:
                # One captured CUDA graph per (batch size, direction): the addresses a
                # graph replays must be the ones it was captured with.
                options.add_run_config_entry("gpu_graph_id", str(self._next_graph_id))
                self._next_graph_id += 1
            bound.append((binding, options))
        buffers = _Buffers(values, out, bound)
        self._buffers[batch] = buffers
        return buffers

    def _launch(self, buffers: _Buffers, parity: int) -> None:
        binding, options = buffers.bound[parity]
        try:
            self._session.run_with_iobinding(binding, options)
        except Exception as e:
            self._fall_back(e)

    def _fall_back(self, e: Exception, cuda_graphs: bool = True) -> NoReturn:
        """A run failed with ``e``: drop fewstep's own ``fuse_conv_bias`` default first,
        then (``cuda_graphs``: a bound run) CUDA graphs, open the session again and raise
        ``_CaptureFailed`` so ``_retrying`` runs it again; with nothing left to drop,
        ``e`` itself."""
        if self.fuse_conv_bias:
            self._drop_fused_bias(e)
        elif cuda_graphs and self.cuda_graph:
            self._warn_no_cuda_graph(e)
        else:
            raise e
        self._session = self._open_session()
        raise _CaptureFailed from e

    def _host(self, value: Any) -> Array:
        out = value.numpy()
        # A CPU OrtValue's numpy() shares its memory, which the next run overwrites.
        return np.array(out, copy=True) if self._device == "cpu" else np.asarray(out)

    def _bound_run(self, batch: int, arrays: Mapping[str, Array]) -> Array:
        buffers = self._allocate(batch)
        for name, arr in arrays.items():
            buffers.upload(name, arr)
        self._launch(buffers, 0)
        return self._host(buffers.out)

    def _bound_loop(self, x: Array, fixed: Mapping[str, Array],
                    steps: Sequence[Mapping[str, Array]]) -> Array:
        buffers = self._allocate(x.shape[0])
        buffers.values["x"].update_inplace(x)
        for name, arr in fixed.items():
            buffers.upload(name, arr)
        parity = 0
        for feeds in steps:
            for name, arr in feeds.items():
                buffers.upload(name, arr)
            self._launch(buffers, parity)
            parity ^= 1
        # After an odd number of steps x is in the output buffer, else back in "x".
        return self._host(buffers.out if parity else buffers.values["x"])


def open_graph(path: str, name: str, **options: Any) -> OrtGraph:
    """Open ``path`` with ONNX Runtime backend ``name`` (ort-cpu, ort-cuda, ort-tensorrt)."""
    if name not in PROVIDERS:
        raise ValueError(f"backend={name!r} is not an ONNX Runtime backend; use one of "
                         f"{', '.join(PROVIDERS)}")
    config = make_config(name, str(path), options)
    meta = read_onnx_meta(path)
    if meta.graph.target == "ort-cuda" and name != "ort-cuda":
        raise ArtifactError(
            f"{Path(path).name} is an ORT-CUDA variant graph (ONNX Runtime's com.microsoft "
            f"GroupNorm/NhwcConv kernels, which only its CUDA provider has), not for {name}: "
            "load the portable graph beside it (the same name without .ort-cuda), or use "
            "--backend ort-cuda"
        )
    if name == "ort-cpu" and meta.graph.precision == "bf16":
        raise ArtifactError(
            f"{Path(path).name} is a bf16 graph and ONNX Runtime's CPU provider has no "
            "bfloat16 Conv/Gemm/MatMul kernels; run it with --backend ort-cuda (or TensorRT), "
            "or export --precision fp32 or fp16 for the CPU"
        )
    return OrtGraph(str(path), meta, config)
