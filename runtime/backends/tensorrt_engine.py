"""TensorRT itself: importing it (or the lean runtime), its logger, and a plan's I/O
tensors checked against the graph I/O contract. Shared by the ``tensorrt`` backend and
``fewstep build``; tensorrt is imported only when a function here is called.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ..errors import ArtifactError
from ..meta import ModelMeta
from ..plan import parse_version

TRT_MISSING: Final = (
    "TensorRT is not installed: pip install 'fewstep[tensorrt]' (x86-64) "
    "or use JetPack's tensorrt on Jetson"
)
MIN_TRT_MAJOR: Final = 10


def import_tensorrt(allow_lean: bool = True) -> tuple[Any, bool]:
    """(the tensorrt module, True if it is the lean runtime ``tensorrt_lean``)."""
    try:
        import tensorrt

        return tensorrt, False
    except ImportError:
        if not allow_lean:
            raise
    return importlib.import_module("tensorrt_lean"), True


def tensorrt_problem() -> str | None:
    """None when a usable TensorRT (10.x or 11.x, or its lean runtime) imports, else why not."""
    try:
        trt, _lean = import_tensorrt()
    except ImportError:
        return TRT_MISSING
    except Exception as e:  # a broken install: missing libnvinfer and the like
        return f"TensorRT does not load ({type(e).__name__}: {e}); reinstall it"
    version = getattr(trt, "__version__", "0")
    try:
        major = parse_version(version)[0]
    except ValueError:
        return f"TensorRT reports version {version!r}; fewstep needs TensorRT 10.x or 11.x"
    if major < MIN_TRT_MAJOR:
        return (f"TensorRT {version} is too old; fewstep needs TensorRT 10.x or 11.x: "
                "pip install -U 'fewstep[tensorrt]' (JetPack 6 ships 10.x)")
    return None


def make_logger(trt: Any, verbose: bool = False, keep: int = 20) -> Any:
    """A TensorRT logger printing warnings and errors to stderr and keeping the last errors."""
    severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.threshold = severity.VERBOSE if verbose else severity.WARNING

        def log(self, sev: Any, msg: str) -> None:
            if sev in (severity.ERROR, severity.INTERNAL_ERROR):
                self.errors = [*self.errors[-(keep - 1):], str(msg)]
            if int(sev) <= int(self.threshold):
                tag = {severity.INTERNAL_ERROR: "internal error", severity.ERROR: "error",
                       severity.WARNING: "warning", severity.INFO: "info"}.get(sev, "verbose")
                print(f"[TensorRT {tag}] {msg}", file=sys.stderr)

    return _Logger()


@dataclass(frozen=True)
class EngineTensor:
    name: str
    is_input: bool
    dtype: np.dtype[Any]
    max_shape: tuple[int, ...]  # at the profile's largest batch


def engine_io(trt: Any, engine: Any, ctx: Any, meta: ModelMeta, max_batch: int, path: str,
              errors: Callable[[], str]) -> list[EngineTensor]:
    """The plan's I/O tensors at batch ``max_batch`` (``ctx`` is left at that batch), or
    an ArtifactError where names, dtypes or shapes differ from the graph I/O contract."""
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    g, io = meta.graph, meta.io
    rebuild = "rebuild it with `fewstep build`"
    if sorted(inputs) != sorted(g.inputs) or outputs != list(g.outputs):
        raise ArtifactError(
            f"{path} has inputs {sorted(inputs)} -> {outputs}, but its sidecar says "
            f"{sorted(g.inputs)} -> {list(g.outputs)}; {rebuild}"
        )
    max_in = io.shapes(max_batch)
    for name in inputs:
        hi = tuple(int(d) for d in engine.get_tensor_profile_shape(name, 0)[2])
        if hi != max_in[name]:
            raise ArtifactError(f"{path}: input {name!r} has max shape {hi} in the plan but "
                                f"{max_in[name]} by its sidecar; {rebuild}")
        if not ctx.set_input_shape(name, hi):
            raise ArtifactError(f"{path}: TensorRT refused input {name!r} at its own max "
                                f"shape {hi} ({errors()}); {rebuild}")
    out = []
    for name in names:
        spec = io.inputs.get(name, io.output)
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        shape = tuple(int(d) for d in ctx.get_tensor_shape(name))
        if dtype != np.dtype(spec.dtype) or shape != spec.shape(max_batch):
            raise ArtifactError(
                f"{path}: tensor {name!r} is {dtype.name} {shape} in the plan at batch "
                f"{max_batch}, but its sidecar says {spec.describe()}; {rebuild}"
            )
        out.append(EngineTensor(name, name in inputs, dtype, shape))
    return out
