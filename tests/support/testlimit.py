"""Testlimit's timeline in the book's "Watching Dynamic Memory" experiment, as committed pages
second by second: the simulated VM of the balancer and counters tests."""

from __future__ import annotations

from pyhv.dynmem.balancer import pages_from_mib

MIB = pages_from_mib(1)
BASELINE = 427 * MIB  # committed at rest: target = 512 MiB = startup, so nothing moves
START, MORE, END = 10, 40, 100  # Testlimit starts, commits more, is terminated


def committed_under_testlimit(t: int) -> int:
    """Committed pages at second t: +1000 MiB while Testlimit holds its memory, and 300 MiB more
    from t=40 (the guest keeps committing: the first addition was not enough)."""
    if START <= t < END:
        return BASELINE + 1000 * MIB + (300 * MIB if t >= MORE else 0)
    return BASELINE
