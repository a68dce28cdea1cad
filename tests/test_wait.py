"""tests/support/wait.py: the one wait-for-condition helper returns the first true value, and
fails naming what it waited for and the last value it saw."""

from __future__ import annotations

import itertools

import pytest

from tests.support.wait import wait_for

pytestmark = pytest.mark.unit


def test_wait_for_returns_the_first_true_value() -> None:
    values = iter([0, None, "", 7, 8])
    assert wait_for(lambda: next(values), 5, "a value", interval=0) == 7


def test_wait_for_fails_naming_what_it_waited_for_and_the_last_value() -> None:
    count = itertools.count()
    with pytest.raises(AssertionError) as e:
        wait_for(lambda: next(count) < 0 and "never", 0.05, "a negative count", interval=0.01)
    assert "a negative count: not within 0.05 s (last value: False)" in str(e.value)


def test_a_zero_timeout_still_looks_once() -> None:
    looks: list[int] = []
    with pytest.raises(AssertionError):
        wait_for(lambda: looks.append(1), 0, "nothing")
    assert looks == [1]
