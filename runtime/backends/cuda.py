"""CUDA through cuda-python: loading, device and pinned buffers, streams, CUDA graphs.

The plumbing under the ``tensorrt`` backend, also used by ``fewstep build`` (the device
it builds for) and the benchmarks (device memory, synchronisation). Every cuda-python
call returns ``(error, *values)``; ``cuda_check`` turns an error into a ``CudaError``.

When CUDA-graph capture is unavailable a graph runs without it: every backend reports
that the same way, with ``warn_no_cuda_graph`` (a ``CudaGraphFallback`` warning naming
the file and the reason).

cuda-python is imported only by ``import_cudart``, so this module imports anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

CUDA_PYTHON_MISSING: Final = (
    "cuda-python is not installed: pip install 'fewstep[tensorrt]' (or pip install cuda-python)"
)


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


class CudaGraphFallback(UserWarning):
    """A graph runs without CUDA graphs (capture or the session refused them)."""


def warn_no_cuda_graph(path: str, why: BaseException | str, stacklevel: int = 3) -> None:
    """The one report of a graph falling back from CUDA graphs to plain launches."""
    text = str(why).strip().splitlines()
    reason = text[0] if text else type(why).__name__
    warnings.warn(f"CUDA graphs unavailable for {Path(path).name} ({reason}); running "
                  "without them", CudaGraphFallback, stacklevel=stacklevel)


def import_cudart() -> Any:
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (>= 12.6) or ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        from cuda import cudart
    return cudart


def cuda_check(result: Any, what: str) -> Any:
    """Every cuda-python call returns (error, *values): raise unless error is cudaSuccess."""
    err, values = result[0], tuple(result[1:])
    if int(err) != 0:
        name = getattr(err, "name", str(err))
        raise CudaError(f"{what} failed: {name} ({int(err)})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    compute_capability: str  # "9.0"
    integrated: bool  # Jetson: GPU memory is the CPU's memory
    total_memory: int
    free_memory: int
    cuda_runtime_version: str  # "12.6"


def device_info(cudart: Any, index: int | None = None) -> DeviceInfo:
    """The current (or given) GPU, via cudaGetDeviceProperties and cudaMemGetInfo."""
    if index is None:
        index = int(cuda_check(cudart.cudaGetDevice(), "cudaGetDevice"))
    else:
        cuda_check(cudart.cudaSetDevice(index), f"cudaSetDevice({index})")
    prop = cuda_check(cudart.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    raw = prop.name
    name = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw))
    name = name.split("\x00", 1)[0].strip()
    free, total = memory_info(cudart)
    version = int(cuda_check(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    return DeviceInfo(
        index=index,
        name=name,
        compute_capability=f"{int(prop.major)}.{int(prop.minor)}",
        integrated=bool(int(prop.integrated)),
        total_memory=total,
        free_memory=free,
        cuda_runtime_version=f"{version // 1000}.{(version % 1000) // 10}",
    )


def device_count(cudart: Any) -> int:
    return int(cuda_check(cudart.cudaGetDeviceCount(), "cudaGetDeviceCount"))


def memory_info(cudart: Any) -> tuple[int, int]:
    """(free, total) bytes of the current device (cudaMemGetInfo)."""
    free, total = cuda_check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")
    return int(free), int(total)


def device_synchronize(cudart: Any) -> None:
    cuda_check(cudart.cudaDeviceSynchronize(), "cudaDeviceSynchronize")


# ---------------------------------------------------------------------------------
# Streams, buffers, copies
# ---------------------------------------------------------------------------------


def new_stream(cudart: Any) -> Any:
    """A non-blocking stream (it does not synchronise with the legacy default stream)."""
    return cuda_check(cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking),
                      "cudaStreamCreateWithFlags")


def synchronize(cudart: Any, stream: Any) -> None:
    cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def destroy_stream(cudart: Any, stream: Any) -> None:
    """Wait for ``stream`` and destroy it; errors are ignored (used on close)."""
    with contextlib.suppress(Exception):
        cudart.cudaStreamSynchronize(stream)
    with contextlib.suppress(Exception):
        cudart.cudaStreamDestroy(stream)


def copy_async(cudart: Any, stream: Any, dst: int, src: int, nbytes: int,
               to_device: bool) -> None:
    """cudaMemcpyAsync host → device (``to_device``) or device → host on ``stream``."""
    kinds = cudart.cudaMemcpyKind
    kind = kinds.cudaMemcpyHostToDevice if to_device else kinds.cudaMemcpyDeviceToHost
    cuda_check(cudart.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")


class PinnedBuffer:
    """Page-locked host memory (cudaMallocHost) viewed as numpy."""

    def __init__(self, cudart: Any, nbytes: int) -> None:
        self.cudart = cudart
        self.nbytes = max(1, nbytes)
        self.ptr: int | None = int(cuda_check(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost"))

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...], offset: int = 0) -> NDArray[Any]:
        assert self.ptr is not None
        count = int(np.prod(shape, dtype=np.int64))
        assert offset + count * dtype.itemsize <= self.nbytes
        raw = (ctypes.c_ubyte * (count * dtype.itemsize)).from_address(self.ptr + offset)
        flat: NDArray[Any] = np.frombuffer(memoryview(raw), dtype=np.uint8)
        return flat.view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr is not None:
            with contextlib.suppress(Exception):
                self.cudart.cudaFreeHost(self.ptr)
            self.ptr = None


class DeviceBuffer:
    """Device memory (cudaMalloc)."""

    def __init__(self, cudart: Any, nbytes: int) -> None:
        self.cudart = cudart
        self.nbytes = max(1, nbytes)
        self.ptr: int | None = int(cuda_check(cudart.cudaMalloc(self.nbytes), "cudaMalloc"))

    def free(self) -> None:
        if self.ptr is not None:
            with contextlib.suppress(Exception):
                self.cudart.cudaFree(self.ptr)
            self.ptr = None


# ---------------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------------


class CapturedGraph:
    """One instantiated CUDA graph (cudaGraphExec_t) and what must outlive it."""

    def __init__(self, cudart: Any, exec_: Any, keep: Any = None) -> None:
        self.cudart = cudart
        self.exec_: Any = exec_
        self.keep: Any = keep  # e.g. the execution context whose shapes the graph fixed

    def launch(self, stream: Any) -> None:
        cuda_check(self.cudart.cudaGraphLaunch(self.exec_, stream), "cudaGraphLaunch")

    def free(self) -> None:
        if self.exec_ is not None:
            with contextlib.suppress(Exception):
                self.cudart.cudaGraphExecDestroy(self.exec_)
            self.exec_ = None
        self.keep = None


def capture_graph(cudart: Any, stream: Any,
                  body: Callable[[], None]) -> tuple[Any, Exception | None]:
    """Capture ``body``'s work on ``stream`` into an instantiated CUDA graph.

    Returns (cudaGraphExec_t, None), or (None, the error) when capture or instantiation
    failed; the stream is then out of capture mode and CUDA's error state is cleared.
    Work that must happen once before capture (TensorRT's enqueue after a shape change)
    is the caller's: enqueue, synchronize, then capture.
    """
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    try:
        cuda_check(cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
    except CudaError as e:
        cudart.cudaGetLastError()
        return None, e
    try:
        body()
    except Exception as e:
        result = cudart.cudaStreamEndCapture(stream)
        if int(result[0]) == 0 and result[1] is not None:
            cudart.cudaGraphDestroy(result[1])
        cudart.cudaGetLastError()
        return None, e
    try:
        graph = cuda_check(cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
    except CudaError as e:
        cudart.cudaGetLastError()
        return None, e
    try:
        exec_ = cuda_check(cudart.cudaGraphInstantiateWithFlags(graph, 0),
                           "cudaGraphInstantiateWithFlags")
    except CudaError as e:
        cudart.cudaGetLastError()
        return None, e
    finally:
        cudart.cudaGraphDestroy(graph)
    return exec_, None
