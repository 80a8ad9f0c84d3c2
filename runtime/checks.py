"""Argument checks shared by the runtime, export and training, each worded once."""

from __future__ import annotations

from typing import Any, TypeGuard

import numpy as np

ETA_RANGE = "[0, 1] (0 = deterministic DDIM, 1 = DDPM-like)"


def is_whole_number(value: object) -> TypeGuard[int | np.integer[Any]]:
    """An int or numpy integer; ``True``/``False`` are not numbers here."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def whole_number(name: str, value: object, low: int | None = None, fix: str = "") -> int:
    """``value`` as an int, or a ValueError: ``n=0 must be a whole number >= 1{fix}``."""
    whole = is_whole_number(value)
    number = int(value) if whole else 0  # type: ignore[call-overload]
    if not whole or (low is not None and number < low):
        shown = number if whole else repr(value)
        at_least = f" >= {low}" if low is not None else ""
        raise ValueError(f"{name}={shown} must be a whole number{at_least}{fix}")
    return number


def optional_whole_number(name: str, value: object, low: int | None = None) -> int | None:
    """``whole_number``, with None passing through."""
    return None if value is None else whole_number(name, value, low, ", or None")


def choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    """``value`` when it is one of ``allowed``, else a ValueError listing them."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(allowed)}")
    return value


def is_number(value: object) -> bool:
    """A Python or numpy number, or a 0-d numpy array (not a bool, not a torch tensor)."""
    if isinstance(value, (bool, np.bool_)):
        return False
    return isinstance(value, (int, float, np.number)) or (
        isinstance(value, np.ndarray) and value.ndim == 0 and value.dtype.kind in "iuf"
    )


def eta(value: Any) -> float:
    """The DDIM ``eta`` as a float in [0, 1] (numpy scalars included), else a ValueError."""
    if not is_number(value):
        raise ValueError(f"eta={value!r} must be a number in {ETA_RANGE}; pass e.g. eta=0.0")
    number = float(value)
    if not 0.0 <= number <= 1.0:  # NaN fails too
        raise ValueError(
            f"eta={number} is outside {ETA_RANGE[:-1]}; eta > 1 makes 1 - a_prev - "
            "sigma_t**2 negative, which is not a DDIM update); pass 0 <= eta <= 1"
        )
    return number
