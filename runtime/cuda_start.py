"""Start the GPU's CUDA context in the background while a process imports.

A new process's first image on the GPU waits for the CUDA driver to create the
device's primary context (≈ 0.2 s on an H200) before ONNX Runtime or TensorRT can do
anything. ``start_context()`` creates it in a daemon thread, through libcuda itself
(ctypes: nothing to import), so that it happens while the process imports numpy and
ONNX Runtime; the runtime API, and so every backend, then finds it made. Call it first
thing in a process that will use the GPU; ``fewstep sample`` does.

It is a head start, never a requirement: where there is no libcuda, no GPU, or the
driver refuses, the thread ends quietly and the backend reports the real problem when
it opens. The context it makes is the one the backend would make (device ``device``'s
primary context), so nothing is created twice.

Measured on an H200 with the default model's fp16 ORT-CUDA variant
(``benchmarks/results/first-image-2026-12-01-h200-stepfirst/``): ``Pipeline.load`` +
the first ``generate`` 1.49 → 1.14 s with it (lever ``quick-head``), 0.84 s together
with ``prefer="step"``. Creating cuDNN's and cuBLAS's handles in the same thread as well
was measured too, and made the first run slower (0.93 s): it is not done. This module
imports only the standard library.
"""

from __future__ import annotations

import ctypes
import importlib.util
import threading
from pathlib import Path
from typing import Final

LIBCUDA: Final = "libcuda.so.1"
THREAD_NAME: Final = "fewstep-cuda-start"
# Backends that open a CUDA context of their own (``--backend`` values)
CUDA_BACKENDS: Final = ("ort-cuda", "ort-tensorrt", "tensorrt")
MAYBE_CUDA: Final = ("auto", "ort")  # CUDA when onnxruntime's CUDA provider is installed


def _retain_primary(device: int, lib_name: str | None = None) -> bool:
    """cuInit + cuDevicePrimaryCtxRetain(device); False on any failure (no driver, no
    such device): the backend will say why when it opens."""
    try:
        lib = ctypes.CDLL(lib_name or LIBCUDA)
        dev, ctx = ctypes.c_int(), ctypes.c_void_p()
        return bool(lib.cuInit(0) == 0
                and lib.cuDeviceGet(ctypes.byref(dev), device) == 0
                and lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) == 0)
    except (OSError, AttributeError):
        return False


def ort_cuda_installed() -> bool:
    """Whether the installed onnxruntime carries its CUDA provider library (looked up on
    disk: onnxruntime itself is not imported)."""
    try:
        spec = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return False
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(d) / "capi" / "libonnxruntime_providers_cuda.so").is_file()
               for d in spec.submodule_search_locations)


def wants_cuda(backend: str, model: str | None = None) -> bool:
    """Whether ``--backend backend`` with ``--model model`` will open a CUDA context."""
    if backend in CUDA_BACKENDS:
        return True
    if backend not in MAYBE_CUDA:
        return False
    if model is not None and model.endswith(".plan"):
        return backend == "auto"
    return ort_cuda_installed()


def start_context(device: int = 0) -> threading.Thread:
    """Create device ``device``'s primary CUDA context in a daemon thread, started now;
    returns the thread (joining it is never needed)."""
    thread = threading.Thread(target=_retain_primary, args=(device,), name=THREAD_NAME,
                              daemon=True)
    thread.start()
    return thread
