"""Harvesting a dirty ring (pyhv.kvm.dirtyring): entries taken strictly in ring order up to the
first one KVM has not filled, each marked RESET, the fetch index wrapping around the ring."""

from __future__ import annotations

import numpy as np
import pytest

from pyhv.kvm import constants as c
from pyhv.kvm.dirtyring import GFN, DirtyRing, check_entries

pytestmark = pytest.mark.unit

N = 256


def _ring() -> tuple[DirtyRing, np.ndarray]:
    buf = bytearray(N * GFN.itemsize)
    return DirtyRing(buf, N), np.frombuffer(buf, dtype=GFN)


def _push(view: np.ndarray, at: int, slot: int, offset: int) -> None:
    view[at % N] = (c.DIRTY_GFN_F_DIRTY, slot, offset)


def test_entries_come_in_order_up_to_the_first_not_yet_dirty_and_are_marked_reset() -> None:
    ring, view = _ring()
    for i, off in enumerate([7, 3, 9]):
        _push(view, i, 1, off)
    view[4] = (c.DIRTY_GFN_F_DIRTY, 1, 99)  # after a gap: not harvested until 3 is filled
    slots, offsets = ring.harvest()
    assert slots.tolist() == [1, 1, 1] and offsets.tolist() == [7, 3, 9]
    assert view["flags"][:3].tolist() == [c.DIRTY_GFN_F_RESET] * 3
    assert view["flags"][4] == c.DIRTY_GFN_F_DIRTY
    assert ring.harvest()[0].size == 0  # nothing new: entry 3 is still empty
    _push(view, 3, 2, 5)
    slots, offsets = ring.harvest()
    assert list(zip(slots.tolist(), offsets.tolist(), strict=True)) == [(2, 5), (1, 99)]
    assert ring.fetch == 5


def test_entries_harvested_but_not_yet_recycled_are_not_taken_again() -> None:
    ring, view = _ring()
    for i in range(N):
        _push(view, i, 0, i)
    assert ring.harvest()[1].tolist() == list(range(N))  # the whole ring, once
    assert ring.suspect  # full past KVM's soft limit: it may have written over entries
    assert ring.harvest()[0].size == 0  # every entry RESET: KVM has not recycled them yet
    view["flags"][:] = 0  # KVM_RESET_DIRTY_RINGS recycled them
    _push(view, N, 0, 1000)  # KVM's next entry is slot 0 of the ring again
    _push(view, N + 1, 0, 1001)
    assert ring.harvest()[1].tolist() == [1000, 1001]
    assert ring.fetch == N + 2


def test_a_ring_out_of_step_after_an_overflow_is_harvested_from_kvm_s_oldest_entry() -> None:
    # KVM wrote past full over entries 10..19 after the harvest marked them RESET and before
    # they were recycled; 20..29 are still RESET (KVM stops recycling at 10), the harvest
    # waits at 30, which is empty: the VP's ring is "full" for ever unless resynced
    ring, view = _ring()
    for i in range(10, 30):
        _push(view, i, 0, i)
    ring.fetch = 10
    assert ring.harvest()[1].tolist() == list(range(10, 30))
    for i in range(10, 20):  # overwritten: DIRTY again, new pages
        _push(view, i, 0, 500 + i)
    assert ring.harvest()[0].size == 0  # out of step: nothing at 30
    assert ring.resync()
    slots, offsets = ring.harvest()
    assert offsets.tolist() == [500 + i for i in range(10, 20)]  # the RESET ones passed over
    assert ring.fetch % N == 30 and ring.suspect
    view["flags"][10:30] = 0  # KVM_RESET_DIRTY_RINGS recycled 10..29
    assert not ring.resync()  # in step again
    _push(view, 30, 0, 7)
    assert ring.harvest()[1].tolist() == [7]


def test_ring_sizes_kvm_takes() -> None:
    check_entries(4096)
    for bad in (0, 100, 128, 131072, True, 4096.0):
        with pytest.raises(ValueError, match="power of two"):
            check_entries(bad)  # type: ignore[arg-type]
