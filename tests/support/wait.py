"""The one way a test waits for a condition it cannot await as an event: poll `predicate` until
it returns a true value or the deadline passes, then fail naming what was awaited and the last
value seen. Where the code has an event (a threading.Event, a VP's halt, a worker's `wait`, the
balancer loop's `wait_looks`), a test awaits that instead."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """The first true value `predicate()` returns within `timeout` seconds; AssertionError
    "<what> within <timeout> s (last value: ...)" when none came. `interval`: the pause between
    two looks (the predicate may be a request to another process)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last value: {value!r})")
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
