"""Backends: the one small protocol the sampling loop drives, and loading by name.

A backend opens one graph file (ONNX or TensorRT plan) and returns a ``Graph``:

* ``run(feeds)``: host arrays in, the graph's single output back on the host.
* ``run_loop(x, fixed, per_step)``: only for ``step`` graphs. Runs the graph once per
  entry of ``per_step``, feeding each output back as the next ``x``; ``fixed`` inputs
  (labels, guidance) stay the same. GPU backends keep x on the device for the whole
  loop (IO binding / device buffers, CUDA graphs); the host fallback is a plain loop.
* ``network_run(feeds, launches)``: the network alone, for timing. The inputs are put
  where the graph reads them (device buffers on a GPU) once; the returned
  ``NetworkRun.call()`` then runs the graph ``launches`` times (a step graph feeding
  its output back as x) and returns when the device is done; ``NetworkRun.method`` says
  in words what was repeated. It stays valid until the graph is closed.

Every graph reads the names, dtypes and shapes of its inputs and output from the graph
I/O contract, ``meta.io``. Options are spelt the same by every backend: ``device_id``
(the GPU index) and ``cuda_graph`` (capture and replay CUDA graphs where possible; a
graph that cannot warns once with ``cuda.CudaGraphFallback`` and runs without).

The loop never knows which backend it drives. Backends are imported lazily, so
``import fewstep.runtime`` needs neither onnxruntime nor tensorrt.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from ..checks import whole_number
from ..errors import BackendUnavailable
from ..meta import ModelMeta

Array = NDArray[Any]
Feeds = Mapping[str, Array]

# name → (module, description). "auto" and "ort" are resolved by ``resolve``.
BACKENDS: dict[str, tuple[str, str]] = {
    "ort-cpu": ("ort", "ONNX Runtime, CPU execution provider"),
    "ort-cuda": ("ort", "ONNX Runtime, CUDA EP with IO binding and CUDA graphs"),
    "ort-tensorrt": ("ort", "ONNX Runtime, TensorRT EP (fp16, engine and timing caches)"),
    "tensorrt": ("tensorrt", "TensorRT plan + sidecar, cuda-python, CUDA graphs"),
    "oracle": ("oracle", "exact ε for a known x0 (tests, overhead benchmarks)"),
}
ALIASES = ("auto", "ort")


@dataclass(frozen=True)
class NetworkRun:
    """The network alone, ready to repeat (``Graph.network_run``)."""

    call: Callable[[], None]  # runs the graph `launches` times, returns when it is done
    method: str               # what is repeated, e.g. "4 × execute_async_v3 on ..."


@runtime_checkable
class Graph(Protocol):
    """One loaded graph file."""

    meta: ModelMeta
    path: str
    backend: str
    max_batch: int | None  # largest batch one call accepts (a TensorRT profile), or None

    def run(self, feeds: Feeds) -> Array: ...

    def run_loop(self, x: Array, fixed: Feeds, per_step: Sequence[Feeds]) -> Array: ...

    def network_run(self, feeds: Feeds, launches: int = 1) -> NetworkRun: ...


def host_loop(graph: Graph, x: Array, fixed: Feeds, per_step: Sequence[Feeds]) -> Array:
    """``run_loop`` for backends that have no device-resident path."""
    for feeds in per_step:
        x = graph.run({"x": x, **fixed, **feeds})
    return x


def check_launches(launches: int) -> int:
    return whole_number("launches", launches, 1)


def _module(name: str) -> Any:
    return importlib.import_module(f"{__name__}.{BACKENDS[name][0]}")


def availability() -> dict[str, str | None]:
    """For every backend name, None when usable here, else the reason it is not."""
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        try:
            out[name] = _module(name).unavailable_reason(name)
        except ImportError as e:  # the backend module itself failed to import
            out[name] = str(e)
    return out


def resolve(name: str, path: str | None = None) -> str:
    """A concrete backend name for ``name`` (which may be ``auto`` or ``ort``)."""
    if name not in BACKENDS and name not in ALIASES:
        raise ValueError(
            f"backend={name!r} is unknown; use one of {', '.join([*ALIASES, *BACKENDS])}"
        )
    if name not in ALIASES:
        return name
    avail = availability()
    if name == "auto" and path is not None and path.endswith(".plan"):
        _module("tensorrt").check_file(path)  # a TensorRT-RTX plan: refused whatever is here
        if avail["tensorrt"] is None:
            return "tensorrt"
        raise BackendUnavailable(f"{path} is a TensorRT plan but {avail['tensorrt']}")
    if avail["ort-cuda"] is None:
        return "ort-cuda"
    if path is not None and _is_variant(path):
        raise BackendUnavailable(
            f"{path} is an ORT-CUDA variant graph, which only ONNX Runtime's CUDA provider "
            f"runs, but {avail['ort-cuda']}; load the portable graph beside it (the same "
            "name without .ort-cuda)"
        )
    return "ort-cpu"


def _is_variant(path: str) -> bool:
    """A readable ONNX graph whose metadata marks it as the ORT-CUDA variant."""
    from ..artifact import read_onnx_meta
    from ..errors import ArtifactError

    if not path.endswith(".onnx"):
        return False
    try:
        return read_onnx_meta(path).graph.target == "ort-cuda"
    except (ArtifactError, OSError):
        return False  # unreadable: the backend that opens it says why


def load(path: str, name: str = "auto", **options: Any) -> Graph:
    """Open one graph file with the named backend."""
    concrete = resolve(name, path)
    if concrete == "tensorrt":  # a TensorRT-RTX plan: refused whatever is installed here
        _module(concrete).check_file(path)
    reason = _module(concrete).unavailable_reason(concrete)
    if reason is not None:
        raise BackendUnavailable(f"backend {concrete!r} is not usable here: {reason}")
    graph: Graph = _module(concrete).open_graph(path, concrete, **options)
    return graph


def as_float32(a: Any) -> NDArray[np.float32]:
    return np.ascontiguousarray(a, dtype=np.float32)
