"""KVM_CLEAR_DIRTY_LOG with MANUAL_DIRTY_LOG_PROTECT2: reading the log no longer clears it; the
VMM re-protects exactly the pages it has copied."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import Partition, enter_long_mode
from pyhv.kvm import constants as c
from tests.guests.build import build_guest
from tests.guests.harness import STACK_TOP, run_until_power_off

pytestmark = pytest.mark.guest

BASE = 0x2000000
TABLE = 0x300000


def _pages(bitmap: bytes) -> list[int]:
    return [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]


def test_with_manual_protect_the_log_stays_until_the_vmm_clears_it() -> None:
    img = build_guest("dirty")
    with Partition("manual-dirty") as p:
        if not p.kvm.check_extension(c.CAP_MANUAL_DIRTY_LOG_PROTECT2):
            pytest.skip("this KVM has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        p.vm.enable_cap(c.CAP_MANUAL_DIRTY_LOG_PROTECT2, 1)  # enable, pages start clean
        p.add_memory(0, 16 << 20)
        region = p.add_memory(BASE, 1 << 20, track_dirty=True)
        p.write(img.base, img.code)
        offsets = [0x1000, 0x9000, 0x40000]
        p.write(TABLE, b"".join((BASE + o).to_bytes(8, "little") for o in offsets))
        vp = p.create_vp(0)
        enter_long_mode(p, vp, img.entry, STACK_TOP, rbx=TABLE, rcx=len(offsets))
        run_until_power_off(p, vp)
        first = region.dirty_bitmap()
        assert _pages(first) == [1, 9, 0x40]
        assert region.dirty_bitmap() == first  # not cleared by reading
        p.vm.clear_dirty_log(region.slot, 0, first[:16])  # pages 0-127: covers 1 and 9 and 0x40
        assert _pages(region.dirty_bitmap()) == []
