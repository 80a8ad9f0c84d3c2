"""The host and device buffers of a TensorRT plan's I/O tensors, and the stream they are
copied on: feeds checked against the graph I/O contract, staged into pinned memory,
copied to and from the device. No TensorRT here: the engine and its execution contexts
are the ``tensorrt`` backend's; this is what it reads and writes through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..meta import ModelMeta
from ..plan import BatchProfile
from . import Array, Feeds, cuda
from .tensorrt_engine import EngineTensor


@dataclass
class Tensor:
    """One I/O tensor: its buffers are sized for the profile's largest batch."""

    name: str
    is_input: bool
    dtype: np.dtype[Any]
    max_shape: tuple[int, ...]
    device: cuda.DeviceBuffer
    host: cuda.PinnedBuffer


# per-step input -> (all steps' host staging, all steps' device copy)
Staging = dict[str, tuple[cuda.PinnedBuffer, cuda.DeviceBuffer]]


class PlanBuffers:
    """Every I/O tensor of one plan (a device and a pinned host buffer each) and the
    stream its copies and launches go to."""

    def __init__(self, cudart: Any, meta: ModelMeta, profile: BatchProfile, path: str) -> None:
        self.cudart, self.meta, self.profile, self.path = cudart, meta, profile, path
        self.tensors: dict[str, Tensor] = {}
        self.stream: Any = cuda.new_stream(cudart)

    def allocate(self, engine_tensors: Sequence[EngineTensor]) -> None:
        """One device + one pinned buffer per I/O tensor, sized for its largest shape."""
        for t in engine_tensors:
            nbytes = int(np.prod(t.max_shape, dtype=np.int64)) * t.dtype.itemsize
            self.tensors[t.name] = Tensor(t.name, t.is_input, t.dtype, t.max_shape,
                                          cuda.DeviceBuffer(self.cudart, nbytes),
                                          cuda.PinnedBuffer(self.cudart, nbytes))

    # -- feeds -------------------------------------------------------------------------

    def validate(self, feeds: Feeds, names: Sequence[str]) -> int:
        """The batch size of ``feeds``, once they name exactly ``names`` and their batch
        lies in the profile; else a ValueError saying what to pass."""
        missing = sorted(set(names) - set(feeds))
        extra = sorted(set(feeds) - set(names))
        if missing or extra:
            raise ValueError(
                f"feeds {sorted(feeds)} do not match the plan's inputs {sorted(names)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unexpected {extra})" if extra else "")
            )
        batch = int(np.shape(feeds["x"])[0]) if np.ndim(feeds["x"]) else 0
        p = self.profile
        if not p.contains(batch):
            raise ValueError(
                f"batch {batch} is outside {Path(self.path).name}'s profile {p} "
                f"(min {p.min}, max {p.max}); pass at most {p.max} images per call or "
                f"rebuild with `fewstep build --batch {min(p.min, max(batch, 1))}:{p.opt}:"
                f"{max(batch, p.max)}`"
            )
        return batch

    def checked(self, name: str, value: Any, batch: int) -> Array:
        want = self.meta.io.inputs[name].shape(batch)
        arr = np.asarray(value)
        if arr.shape != want:
            raise ValueError(f"input {name!r} has shape {arr.shape}, expected {want}")
        return np.ascontiguousarray(arr, dtype=self.tensors[name].dtype)

    def nbytes(self, name: str, batch: int) -> int:
        count = int(np.prod(self.meta.io.inputs[name].shape(batch), dtype=np.int64))
        return count * self.tensors[name].dtype.itemsize

    def stage(self, name: str, value: Any, batch: int) -> None:
        arr = self.checked(name, value, batch)
        self.tensors[name].host.view(arr.dtype, arr.shape)[...] = arr

    def stage_inputs(self, feeds: Feeds) -> int:
        """Check ``feeds`` against the graph's inputs and copy them to the pinned buffers;
        the batch size."""
        batch = self.validate(feeds, self.meta.graph.inputs)
        for name in self.meta.graph.inputs:
            self.stage(name, feeds[name], batch)
        return batch

    def new_staging(self, names: Sequence[str], steps: int, batch: int) -> Staging:
        """Pinned and device buffers holding ``steps`` values of each per-step input."""
        staging: Staging = {}
        for name in names:
            n = steps * self.nbytes(name, batch)
            staging[name] = (cuda.PinnedBuffer(self.cudart, n),
                             cuda.DeviceBuffer(self.cudart, n))
        return staging

    # -- copies on the stream ------------------------------------------------------------

    def memcpy(self, dst: int, src: int, nbytes: int, to_device: bool) -> None:
        cuda.copy_async(self.cudart, self.stream, dst, src, nbytes, to_device)

    def copies_in(self, batch: int, names: Sequence[str]) -> None:
        for name in names:
            t = self.tensors[name]
            assert t.device.ptr is not None and t.host.ptr is not None
            self.memcpy(t.device.ptr, t.host.ptr, self.nbytes(name, batch), True)

    @staticmethod
    def out_shape(t: Tensor, batch: int) -> tuple[int, ...]:
        return (batch, *t.max_shape[1:])

    def copy_out(self, t: Tensor, batch: int, src: int | None = None) -> None:
        nbytes = int(np.prod(self.out_shape(t, batch), dtype=np.int64)) * t.dtype.itemsize
        assert t.host.ptr is not None and t.device.ptr is not None
        self.memcpy(t.host.ptr, src if src is not None else t.device.ptr, nbytes, False)

    def sync(self) -> None:
        cuda.synchronize(self.cudart, self.stream)

    def result(self, t: Tensor, batch: int) -> Array:
        return np.array(t.host.view(t.dtype, self.out_shape(t, batch)), copy=True)

    def free(self) -> None:
        """Free every buffer and the stream (after the caller synchronised)."""
        for t in self.tensors.values():
            t.device.free()
            t.host.free()
        self.tensors = {}
        if self.stream is not None:
            cuda.destroy_stream(self.cudart, self.stream)
            self.stream = None


def free_staging(staging: Staging) -> None:
    for host, dev in staging.values():
        host.free()
        dev.free()
