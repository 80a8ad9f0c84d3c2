"""fewstep.runtime: run exported few-step diffusion models with numpy + ONNX Runtime/TensorRT.

``from fewstep.runtime import Pipeline`` is the entry point. Importing this package
loads neither numpy nor torch; ONNX Runtime and TensorRT are imported when a backend
is first used.
"""

from __future__ import annotations

from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, BackendUnavailable, NumericalError

try:
    __version__ = _metadata.version("fewstep")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from .meta import ModelMeta
    from .pipeline import Pipeline

__all__ = [
    "ArtifactError",
    "BackendUnavailable",
    "ModelMeta",
    "NumericalError",
    "Pipeline",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from .pipeline import Pipeline

        return Pipeline
    if name == "ModelMeta":
        from .meta import ModelMeta

        return ModelMeta
    raise AttributeError(f"module 'fewstep.runtime' has no attribute {name!r}")
