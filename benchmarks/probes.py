"""What the latency suite reads besides the clock: host RSS and device memory.

``Cuda`` finds cudaMemGetInfo / cudaDeviceSynchronize through whatever is importable:
fewstep's own cuda-python plumbing (``runtime.backends.cuda``), CuPy, PyTorch, or
libcudart through ctypes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path


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
        from fewstep.runtime.backends import cuda

        cudart = cuda.import_cudart()
        return (lambda: cuda.memory_info(cudart)), (lambda: cuda.device_synchronize(cudart))

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
