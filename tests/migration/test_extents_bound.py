"""The destination's EXTENTS list is bounded (issue 11, finding 8): a source sending more runs
than MAX_POPULATE_RUNS grows it no further; the runs past it are counted and left to the
receiver's first touch."""

from __future__ import annotations

import mmap
from types import SimpleNamespace

import pytest

from pyhv.migration import destination
from pyhv.migration.destination import _Populater

pytestmark = pytest.mark.unit

PAGE = 4096


def test_extents_past_the_bound_are_counted_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(destination, "MAX_POPULATE_RUNS", 1000)
    ram = mmap.mmap(-1, 64 * PAGE)
    region = SimpleNamespace(gpa=0, host_address=_address(ram))
    p = SimpleNamespace(gpa_space=SimpleNamespace(find=lambda gpa: region))
    pop = _Populater()
    try:
        for _ in range(30):  # 30 EXTENTS frames of 64 one-page runs each
            pop.add(p, [(i * PAGE, 1) for i in range(64)])
        assert len(pop._runs) == 1000
        assert pop.skipped == 30 * 64 - 1000
    finally:
        pop.stop()
        ram.close()


def _address(m: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(m))
