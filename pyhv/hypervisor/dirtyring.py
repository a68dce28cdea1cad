"""A partition's dirty rings: every VP's ring harvested into per-slot page masks, and the pages
each VP wrote counted, so dirty pages can be asked of a region as with the bitmap while the
count says which VP wrote them.

A partition created with `dirty_ring_entries` logs the pages written in its dirty-logged slots
in one ring per VP (pyhv.kvm.dirtyring) instead of KVM's bitmap, which KVM then refuses. A
region's `dirty_bitmap()` harvests all rings and hands over the pages gathered for its slot: the
callers of the bitmap (migration, Smart Paging's move) do not know which log is on. Harvests
come from anyone who asks (a migration's harvester every few ms, a region's reader) and from a
VP whose ring filled up (KVM_EXIT_DIRTY_RING_FULL: it harvests itself before it runs again).
After each harvest that found pages, the listeners hear how many each VP wrote (the dirty
limit's measure).

A page's contents must be read after the harvest that listed it (which re-protects it): a write
after the harvest and before the reset is in the contents read later, one after the reset makes
a new entry. Reading `dirty_bitmap()` first and the pages after, as the bitmap's callers do,
keeps that order.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pyhv.hypervisor.memory import MemoryRegion
    from pyhv.kvm import Vcpu, Vm
    from pyhv.kvm.dirtyring import DirtyRing

log = logging.getLogger(__name__)

#: listener(pages written per VP index since the last harvest, time.monotonic() of the harvest)
HarvestListener = Callable[[dict[int, int], float], None]

SLOT_ID_MASK = 0xFFFF  # the entry's slot is (address space << 16) | slot id


class DirtyRings:
    """The rings of one partition's VPs and what was harvested from them, per memory slot."""

    def __init__(self, vm: Vm, entries: int, slot_pages: Callable[[int], int | None]) -> None:
        self.vm = vm
        self.entries = entries
        self.slot_pages = slot_pages  #: pages of the RAM slot with that id (None: no such slot)
        self._rings: dict[int, DirtyRing] = {}
        self._lock = threading.Lock()  # one harvester at a time; the pending masks
        self._pending: dict[int, np.ndarray] = {}  # slot -> bool per page, harvested not taken
        self.listeners: list[HarvestListener] = []
        self.written: dict[int, int] = {}  # VP index -> pages harvested from its ring, ever
        self.full_exits: dict[int, int] = {}  # VP index -> KVM_EXIT_DIRTY_RING_FULL exits
        self.harvests = 0
        self.dropped = 0  # entries of no RAM slot (another address space, a removed slot)
        #: times a ring was found full or out of step (KVM may have lost entries): each makes
        #: every page of every slot count as dirty at its next take
        self.overflows = 0
        self._reset_for = 0
        self._taken_at: dict[int, int] = {}  # slot -> self.overflows at its last take

    def add_vcpu(self, vcpu: Vcpu) -> None:
        """Map the ring of a VP just created."""
        self._rings[vcpu.index] = vcpu.dirty_ring(self.entries)
        self.written.setdefault(vcpu.index, 0)
        self.full_exits.setdefault(vcpu.index, 0)

    def harvest(self) -> dict[int, int]:
        """Collect every ring's new entries into the slots' pending pages and reset the rings;
        returns the distinct pages each VP wrote since the last harvest (only VPs that wrote)."""
        with self._lock:
            counts = self._harvest_locked()
        if counts:
            now = time.monotonic()
            for listener in list(self.listeners):
                listener(counts, now)
        return counts

    def ring_full(self, vp_index: int) -> None:
        """A VP left KVM_RUN with its ring full: harvest (on its own thread) so it can run on.
        A ring that gave nothing is out of step with KVM (an overflow): resync it first."""
        self.full_exits[vp_index] = self.full_exits.get(vp_index, 0) + 1
        ring = self._rings.get(vp_index)
        if ring is not None:
            with self._lock:
                before = ring.fetch
            if not self.harvest().get(vp_index):
                with self._lock:
                    moved = ring.fetch == before and ring.resync()
                if moved:
                    self.harvest()

    def _harvest_locked(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        got: list[tuple[np.ndarray, np.ndarray]] = []
        for index, ring in self._rings.items():
            slots, offsets = ring.harvest()
            if ring.suspect:  # entries may be lost: every page counts as dirty, once
                ring.suspect = False
                self.overflows += 1
                if self.overflows & (self.overflows - 1) == 0:  # the 1st, 2nd, 4th, 8th...
                    log.warning(
                        "dirty ring of VP %d (%d entries) overflowed (%d times in all): every "
                        "logged page counts as dirty once; a larger ring avoids it",
                        index,
                        ring.entries,
                        self.overflows,
                    )
            if slots.size:
                # distinct pages: KVM's emulator (all CPL0 code here) logs every write it
                # emulates, a native write only a page's first since its reset
                n = int(np.unique((slots << 40) | offsets).size)
                counts[index] = n
                self.written[index] = self.written.get(index, 0) + n
                got.append((slots, offsets))
        if not got:
            if self.overflows != self._reset_for:
                self._reset_for = self.overflows
                self.vm.reset_dirty_rings()  # a resync may have left entries marked RESET
            return counts
        self.vm.reset_dirty_rings()  # after every entry is marked RESET, before the pages go
        self.harvests += 1
        slots = np.concatenate([s for s, _ in got])
        offsets = np.concatenate([o for _, o in got])
        for slot in np.unique(slots).tolist():
            sel = offsets[slots == slot]
            pages = self.slot_pages(slot) if slot <= SLOT_ID_MASK else None
            if pages is None:  # another address space (SMM), or a slot removed meanwhile
                self.dropped += int(sel.size)
                continue
            mask = self._pending.get(slot)
            if mask is None or mask.size != pages:
                mask = self._pending[slot] = np.zeros(pages, dtype=bool)
            # the ring is in memory the guest's writes reach through KVM: an offset past the
            # slot (or past 2**63, negative once widened to int64) is dropped, never indexed
            inside = sel[(sel >= 0) & (sel < pages)]
            self.dropped += int(sel.size - inside.size)
            mask[inside] = True
        return counts

    def take(self, slot: int, pages: int) -> np.ndarray:
        """Bool per page of the slot: written since the last take (harvests first)."""
        self.harvest()
        with self._lock:
            mask = self._pending.pop(slot, None)
            if self._taken_at.get(slot, 0) != self.overflows:
                self._taken_at[slot] = self.overflows
                return np.ones(pages, dtype=bool)
        if mask is not None and mask.size == pages:
            return mask
        out = np.zeros(pages, dtype=bool)
        if mask is not None:
            n = min(mask.size, pages)
            out[:n] = mask[:n]
        return out

    def bitmap(self, region: MemoryRegion) -> bytes:
        """`take` in KVM_GET_DIRTY_LOG's form (bit n = page n, whole 64-bit words): what a
        region's dirty_bitmap() returns when the partition has rings."""
        mask = self.take(region.slot, region.pages)
        packed = np.packbits(mask, bitorder="little").tobytes()
        return packed.ljust(-(-len(packed) // 8) * 8, b"\0")

    def close(self) -> None:
        with self._lock:
            for ring in self._rings.values():
                ring.close()
            self._rings.clear()
            self._pending.clear()
