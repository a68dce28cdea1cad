"""A partition's dirty rings harvested (pyhv.hypervisor.dirtyring), on rings in plain memory:
pages gathered per slot and counted per VP (distinct pages), KVM_RESET_DIRTY_RINGS after each
harvest that found any, and a ring out of step after an overflow resynced with every page then
counted dirty once."""

from __future__ import annotations

import numpy as np
import pytest

from pyhv.hypervisor.dirtyring import DirtyRings
from pyhv.kvm import constants as c
from pyhv.kvm.dirtyring import GFN, DirtyRing

pytestmark = pytest.mark.unit

N = 256


class _Vm:
    resets = 0

    def reset_dirty_rings(self) -> int:
        self.resets += 1
        return 0


def _rings() -> tuple[DirtyRings, list[np.ndarray], _Vm]:
    vm = _Vm()
    rings = DirtyRings(vm, N, {0: 64, 1: 16}.get)  # type: ignore[arg-type]
    views = []
    for index in (0, 1):
        buf = bytearray(N * GFN.itemsize)
        rings._rings[index] = DirtyRing(buf, N)
        views.append(np.frombuffer(buf, dtype=GFN))
    return rings, views, vm


def _push(view: np.ndarray, at: int, slot: int, offset: int) -> None:
    view[at % N] = (c.DIRTY_GFN_F_DIRTY, slot, offset)


def test_pages_are_gathered_per_slot_and_counted_per_vp() -> None:
    rings, views, vm = _rings()
    heard = []
    rings.listeners.append(lambda counts, now: heard.append(counts))
    for i, (slot, off) in enumerate([(0, 5), (0, 5), (0, 9), (1, 3)]):  # page 5 twice (CPL0)
        _push(views[0], i, slot, off)
    _push(views[1], 0, 0, 9)
    _push(views[1], 1, 7, 1)  # a slot that is gone: dropped, not an error
    assert rings.harvest() == {0: 3, 1: 2}
    assert heard == [{0: 3, 1: 2}] and vm.resets == 1 and rings.dropped == 1
    assert np.flatnonzero(rings.take(0, 64)).tolist() == [5, 9]
    assert np.flatnonzero(rings.take(1, 16)).tolist() == [3]
    assert not rings.take(0, 64).any()  # taken: nothing new
    assert vm.resets == 1  # harvests that found nothing reset nothing


def test_a_ring_full_exit_on_a_ring_out_of_step_resyncs_and_counts_every_page_dirty() -> None:
    rings, views, vm = _rings()
    ring = rings._rings[0]
    for i in range(10, 30):
        _push(views[0], i, 0, i)
    ring.fetch = 10
    rings.harvest()
    rings.take(0, 64)
    for i in range(10, 20):  # KVM wrote past full over entries marked RESET, not recycled
        _push(views[0], i, 0, 40 + i)
    rings.ring_full(0)  # the entry the harvest waits at (30) is empty: out of step
    assert rings.overflows == 1 and rings.full_exits[0] == 1
    assert ring.fetch % N == 30
    assert rings.take(0, 64).all()  # pages may be lost: the whole slot counts, once
    assert rings.take(1, 16).all()
    assert not rings.take(0, 64).any()


def test_an_entry_past_its_slot_is_dropped_not_indexed() -> None:
    rings, views, vm = _rings()
    _push(views[0], 0, 0, 64)  # one past slot 0's 64 pages
    _push(views[0], 1, 0, 2**64 - 1)  # negative once widened to int64: must not wrap around
    _push(views[0], 2, 0, 7)
    rings.harvest()
    assert rings.dropped == 2
    assert np.flatnonzero(rings.take(0, 64)).tolist() == [7]
