"""The exceptions fewstep raises for user-facing problems.

Every message names the value, what was expected and the fix, on one line.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_SHOWN = 200  # characters of an untrusted string shown in one message


def inert(text: object, limit: int = MAX_SHOWN) -> str:
    """``text`` safe to print on a terminal in one line: every character that is not
    printable (escape sequences, newlines, bidi controls) shown as its escape (``\\x1b``),
    and the middle elided past ``limit`` characters."""
    s = _elide(str(text), limit)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in s)


def quote(text: object, limit: int = MAX_SHOWN) -> str:
    """``repr`` of an untrusted string, elided past ``limit`` characters: quoted, one
    line, every unprintable character escaped."""
    return repr(_elide(str(text), limit))


def some_of(names: Sequence[object], shown: int = 8) -> str:
    """The first few of ``names`` (made inert), and how many there are in all."""
    head = ", ".join(inert(n, 60) for n in names[:shown])
    return head if len(names) <= shown else f"{head}, ... ({len(names)} in all)"


def _elide(s: str, limit: int) -> str:
    return s if len(s) <= limit else f"{s[: limit // 2]}...{s[-(limit // 2):]} ({len(s)} chars)"


class ArtifactError(ValueError):
    """A model file (checkpoint, ONNX, plan, sidecar) is unreadable, foreign or mismatched."""


class BackendUnavailable(RuntimeError):
    """A backend's library or device is missing on this machine."""


class NumericalError(RuntimeError):
    """A generation produced NaN or Inf (for example fp16 overflow)."""
