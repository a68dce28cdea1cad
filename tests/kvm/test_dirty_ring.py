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
        # twice); a native (CPL3) write logs a page once until the ring's reset re-protects it
        assert p.dirty_rings.written[0] in (3, 4)
        assert _pages(region.dirty_bitmap()) == []  # taken: nothing new since


@pytest.mark.guest
def test_a_vp_that_fills_its_ring_harvests_it_and_every_page_is_kept() -> None:
    # 256 entries (KVM keeps some in reserve): 600 pages fill it twice over
    with Partition("ring-full", dirty_ring_entries=256) as p:
        assert p.dirty_rings is not None
        p.add_memory(0, 16 << 20)
        region = p.add_memory(BASE, 4 << 20, track_dirty=True)
        _run_writes(p, [i * 0x1000 for i in range(600)])
        assert p.dirty_rings.full_exits[0] >= 2
        assert _pages(region.dirty_bitmap()) == list(range(600))
        assert p.dirty_rings.written[0] == 600


@pytest.mark.kvm
def test_a_ring_size_kvm_cannot_take_is_refused_naming_the_sizes() -> None:
    with pytest.raises(ValueError, match="power of two from 256 to 65536"):
        Partition("bad-ring", dirty_ring_entries=1000)
