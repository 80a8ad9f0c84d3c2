"""runtime/backends/cuda.py: error checking, the CUDA-graph fallback report, capture's
error handling, and (on a GPU with cuda-python) real buffers and graphs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fewstep.runtime.backends import cuda
from fewstep.runtime.backends.cuda import CudaError, CudaGraphFallback, cuda_check


def test_cuda_check() -> None:
    assert cuda_check((0, 5), "x") == 5
    assert cuda_check((0,), "x") is None
    assert cuda_check((0, 1, 2), "x") == (1, 2)
    with pytest.raises(CudaError, match=r"cudaMalloc failed: 2 \(2\)"):
        cuda_check((2, None), "cudaMalloc")


def test_cuda_graph_fallback_is_one_warning_naming_the_file_and_reason() -> None:
    with pytest.warns(CudaGraphFallback, match=r"^CUDA graphs unavailable for model.step.plan "
                                               r"\(operation not permitted\); running without "
                                               r"them$"):
        cuda.warn_no_cuda_graph("/models/model.step.plan",
                                RuntimeError("operation not permitted\nstack detail"))
    assert issubclass(CudaGraphFallback, UserWarning)


class _Recorder:
    """A cudart stand-in that records calls: capture's bookkeeping without a GPU."""

    class cudaStreamCaptureMode:
        cudaStreamCaptureModeThreadLocal = 2

    def __init__(self, fail: str = "") -> None:
        self.calls: list[str] = []
        self.fail = fail

    def _result(self, name: str, *values: Any) -> tuple[Any, ...]:
        self.calls.append(name)
        return (1 if name == self.fail else 0, *values)

    def cudaStreamBeginCapture(self, stream: Any, mode: Any) -> tuple[Any, ...]:
        return self._result("begin")

    def cudaStreamEndCapture(self, stream: Any) -> tuple[Any, ...]:
        return self._result("end", "graph")

    def cudaGraphInstantiateWithFlags(self, graph: Any, flags: int) -> tuple[Any, ...]:
        return self._result("instantiate", "exec")

    def cudaGraphDestroy(self, graph: Any) -> tuple[Any, ...]:
        return self._result("destroy")

    def cudaGetLastError(self) -> tuple[Any, ...]:
        return self._result("clear")


def test_capture_graph_ends_capture_and_clears_errors_on_every_failure() -> None:
    ok = _Recorder()
    exec_, error = cuda.capture_graph(ok, "stream", lambda: ok.calls.append("body"))
    assert (exec_, error) == ("exec", None)
    assert ok.calls == ["begin", "body", "end", "instantiate", "destroy"]

    def refuse() -> None:
        raise RuntimeError("enqueue refused")

    body_fails = _Recorder()
    exec_, error = cuda.capture_graph(body_fails, "stream", refuse)
    assert exec_ is None and isinstance(error, RuntimeError)
    assert body_fails.calls == ["begin", "end", "destroy", "clear"]  # out of capture mode

    for step, expected in (("begin", ["begin", "clear"]),
                           ("end", ["begin", "body", "end", "clear"]),
                           ("instantiate", ["begin", "body", "end", "instantiate", "clear",
                                            "destroy"])):
        rec = _Recorder(fail=step)
        exec_, error = cuda.capture_graph(rec, "stream", lambda r=rec: r.calls.append("body"))
        assert exec_ is None and isinstance(error, CudaError), step
        assert rec.calls == expected, step


# ---------------------------------------------------------------------------------
# On a GPU with cuda-python
# ---------------------------------------------------------------------------------


@pytest.fixture
def cudart() -> Any:
    try:
        rt = cuda.import_cudart()
    except ImportError:
        pytest.skip("cuda-python is not installed")
    try:
        if cuda.device_count(rt) < 1:
            pytest.skip("no CUDA GPU")
    except CudaError as e:
        pytest.skip(f"no CUDA GPU ({e})")
    return rt


@pytest.mark.gpu
def test_cuda_buffers_and_graph_capture(cudart: Any) -> None:
    """Pinned/device buffers, async copies and a captured CUDA graph, as the backend uses."""
    info = cuda.device_info(cudart)
    assert info.name and "." in info.compute_capability and info.free_memory > 0
    free, total = cuda.memory_info(cudart)
    assert 0 < free <= total
    stream = cuda.new_stream(cudart)
    n = 1024
    src, dst = cuda.PinnedBuffer(cudart, n * 4), cuda.PinnedBuffer(cudart, n * 4)
    dev = cuda.DeviceBuffer(cudart, n * 4)
    assert src.ptr is not None and dst.ptr is not None and dev.ptr is not None

    def body() -> None:
        cuda.copy_async(cudart, stream, dev.ptr, src.ptr, n * 4, to_device=True)
        cuda.copy_async(cudart, stream, dst.ptr, dev.ptr, n * 4, to_device=False)

    exec_, error = cuda.capture_graph(cudart, stream, body)
    assert error is None and exec_ is not None
    graph = cuda.CapturedGraph(cudart, exec_)
    for k in range(3):  # the graph reads the pinned buffer at launch time
        src.view(np.dtype(np.float32), (n,))[...] = np.arange(n, dtype=np.float32) + k
        graph.launch(stream)
        cuda.synchronize(cudart, stream)
        np.testing.assert_array_equal(dst.view(np.dtype(np.float32), (n,)),
                                      np.arange(n, dtype=np.float32) + k)

    def failing() -> None:
        raise RuntimeError("enqueue refused")

    exec_, error = cuda.capture_graph(cudart, stream, failing)
    assert exec_ is None and isinstance(error, RuntimeError)
    body()  # the stream is usable again after a failed capture
    cuda.synchronize(cudart, stream)
    cuda.device_synchronize(cudart)
    graph.free()
    for buf in (src, dst, dev):
        buf.free()
    cuda.destroy_stream(cudart, stream)
