"""runtime/checks.py: the shared argument checks and their one wording each."""

from __future__ import annotations

import numpy as np
import pytest

from fewstep.runtime import checks


@pytest.mark.parametrize("value", [True, False, np.bool_(True), 2.0, 2.5, "3", None,
                                   np.float32(1)])
def test_whole_number_refuses_bools_floats_and_text(value: object) -> None:
    assert not checks.is_whole_number(value)
    with pytest.raises(ValueError, match=r"^n=.* must be a whole number >= 1; fix$"):
        checks.whole_number("n", value, 1, "; fix")


def test_whole_number_accepts_numpy_integers_and_checks_the_bound() -> None:
    assert checks.whole_number("n", np.int64(3), 1) == 3
    assert type(checks.whole_number("n", np.uint8(3))) is int
    assert checks.whole_number("offset", -2) == -2  # no bound unless asked
    with pytest.raises(ValueError, match=r"^steps=0 must be a whole number >= 1$"):
        checks.whole_number("steps", np.int64(0), 1)  # the number, not np.int64(0)
    assert checks.optional_whole_number("batch_size", None, 1) is None
    with pytest.raises(ValueError, match=r"^batch_size=0 must be a whole number >= 1, or None$"):
        checks.optional_whole_number("batch_size", 0, 1)


def test_eta() -> None:
    assert checks.eta(0) == 0.0 and checks.eta(np.float32(0.5)) == 0.5
    assert checks.eta(np.array(1.0)) == 1.0
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"is outside \[0, 1\].*pass 0 <= eta <= 1"):
            checks.eta(bad)
    for bad in (True, "0.5", None, np.zeros(2)):
        with pytest.raises(ValueError, match=r"must be a number in \[0, 1\]"):
            checks.eta(bad)


def test_choice() -> None:
    assert checks.choice("spacing", "trailing", ("leading", "trailing")) == "trailing"
    with pytest.raises(ValueError, match=r"^spacing='x' is not supported; use one of a, b$"):
        checks.choice("spacing", "x", ("a", "b"))
    with pytest.raises(ValueError, match="is not supported"):
        checks.choice("spacing", ["a"], ("a", "b"))  # unhashable: still the one message
