"""The exceptions fewstep raises for user-facing problems.

Every message names the value, what was expected and the fix, on one line.
"""

from __future__ import annotations


class ArtifactError(ValueError):
    """A model file (checkpoint, ONNX, plan, sidecar) is unreadable, foreign or mismatched."""


class BackendUnavailable(RuntimeError):
    """A backend's library or device is missing on this machine."""


class NumericalError(RuntimeError):
    """A generation produced NaN or Inf (for example fp16 overflow)."""
