"""fewstep.runtime: run exported few-step diffusion models with numpy + ONNX Runtime/TensorRT.

``from fewstep.runtime import Pipeline`` is the entry point. Importing this package
loads neither numpy nor torch; ONNX Runtime and TensorRT are imported when a backend
is first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, BackendUnavailable, NumericalError

if TYPE_CHECKING:
    from .meta import ModelMeta
    from .pipeline import Pipeline

    __version__: str

__all__ = [
    "ArtifactError",
    "BackendUnavailable",
    "ModelMeta",
    "NumericalError",
    "Pipeline",
    "__version__",
]


def _version() -> str:
    # importlib.metadata costs ~30 ms of every start (most of this package's import time),
    # so the version is looked up when first asked for, not on import.
    from importlib import metadata

    try:
        return metadata.version("fewstep")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":
        version = _version()
        globals()["__version__"] = version
        return version
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "ModelMeta":
        from .meta import ModelMeta

        return ModelMeta
    raise AttributeError(f"module 'fewstep.runtime' has no attribute {name!r}")
