"""KVM's dirty ring (KVM_CAP_DIRTY_LOG_RING): a partition created with rings logs the pages its
VPs write in a ring per VP; a region's dirty bitmap comes from the rings, each VP's pages are
counted, and a VP that fills its ring harvests it itself (KVM_EXIT_DIRTY_RING_FULL) and goes on."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import Partition, enter_long_mode
from pyhv.kvm import KvmError
from tests.guests.build import build_guest
from tests.guests.harness import STACK_TOP, run_until_power_off

BASE = 0x2000000
TABLE = 0x300000


def _pages(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def _run_writes(p: Partition, offsets: list[int]) -> None:
    img = build_guest("dirty")
    p.write(img.base, img.code)
    p.write(TABLE, b"".join((BASE + o).to_bytes(8, "little") for o in offsets))
    vp = p.create_vp(0)
    enter_long_mode(p, vp, img.entry, STACK_TOP, rbx=TABLE, rcx=len(offsets))
    run_until_power_off(p, vp)


@pytest.mark.guest
def test_the_ring_records_exactly_the_pages_the_guest_wrote() -> None:
    with Partition("ring", dirty_ring_entries=256) as p:
        assert p.dirty_rings is not None
        p.add_memory(0, 16 << 20)
        region = p.add_memory(BASE, 1 << 20, track_dirty=True)
        with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG"):  # refused with the ring on
            p.vm.get_dirty_log(region.slot, region.pages)
        _run_writes(p, [0x1000, 0x9000, 0x40000, 0x9008])  # page 9 twice: one entry
        assert _pages(region.dirty_bitmap()) == [1, 9, 0x40]
        # KVM's emulator runs CPL0 code here and logs each write it emulates (4 entries, page 9
        # twice): a VP's count is of distinct pages
        assert p.dirty_rings.written == {0: 3}
        assert _pages(region.dirty_bitmap()) == []  # taken: nothing new since


@pytest.mark.guest
def test_hundreds_of_pages_all_come_back_and_are_counted_once() -> None:
    # (No ring-full exit here: the CPL0 emulator of this KVM logs writes without checking the
    # ring's soft limit, so a CPL0 burst past it overflows the ring (KVM warns, entries lost);
    # the ring-full exits of CPL3 writers are in tests/migration/test_dirty_limit.py.)
    with Partition("ring-many", dirty_ring_entries=4096) as p:
        assert p.dirty_rings is not None
        p.add_memory(0, 16 << 20)
        region = p.add_memory(BASE, 4 << 20, track_dirty=True)
        _run_writes(p, [i * 0x1000 for i in range(600)])
        assert _pages(region.dirty_bitmap()) == list(range(600))
        assert p.dirty_rings.written[0] == 600


@pytest.mark.kvm
def test_a_ring_size_kvm_cannot_take_is_refused_naming_the_sizes() -> None:
    with pytest.raises(ValueError, match="power of two from 256 to 65536"):
        Partition("bad-ring", dirty_ring_entries=1000)
