"""A vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING): the pages it wrote in dirty-logged memory
slots, one `kvm_dirty_gfn` entry each, in the order it wrote them.

KVM pushes an entry (flags DIRTY) the first time the vCPU writes a page since the page was last
reset; user space harvests entries in ring order, sets RESET on each, and calls
KVM_RESET_DIRTY_RINGS on the VM, which re-protects those pages and frees their entries. A vCPU
whose ring is nearly full leaves KVM_RUN with KVM_EXIT_DIRTY_RING_FULL until that happens.
The ring is enabled on the VM before its first vCPU (`Vm.enable_dirty_ring`) and mapped at
page `DIRTY_LOG_PAGE_OFFSET` of each vCPU fd; KVM_GET_DIRTY_LOG is refused while it is on.
"""

from __future__ import annotations

import mmap

import numpy as np

from pyhv.kvm import constants as c

#: numpy's view of `structs.kvm_dirty_gfn` (16 bytes: u32 flags, u32 slot, u64 offset)
GFN = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])
ENTRY_SIZE = GFN.itemsize
MIN_ENTRIES = 256  # KVM wants at least a page of entries
MAX_ENTRIES = 65536  # KVM_DIRTY_RING_MAX_ENTRIES
RESERVED = 64  # KVM_DIRTY_RING_RSVD_ENTRIES: entries KVM keeps free past its soft limit


def check_entries(n: int) -> None:
    """ValueError unless `n` is a ring size KVM takes: a power of two, 256 to 65536."""
    if (
        isinstance(n, bool)
        or not isinstance(n, int)
        or n & (n - 1)
        or not (MIN_ENTRIES <= n <= MAX_ENTRIES)
    ):
        raise ValueError(
            f"dirty ring of {n!r} entries: use a power of two from {MIN_ENTRIES} to "
            f"{MAX_ENTRIES} (e.g. 4096), or 0 for the dirty bitmap"
        )


class DirtyRing:
    """The ring of one vCPU, mapped from its fd. `harvest()` is not thread-safe: one harvester
    at a time (the caller's lock), then KVM_RESET_DIRTY_RINGS on the VM."""

    def __init__(self, buffer: mmap.mmap | bytearray, entries: int) -> None:
        """The ring in `buffer` (the vCPU's mapping: see `map_ring`)."""
        check_entries(entries)
        self.entries = entries
        self._mm: mmap.mmap | bytearray | None = buffer
        self._ring = np.frombuffer(buffer, dtype=GFN, count=entries)
        self._flags = self._ring["flags"]  # views into the shared mapping
        self.fetch = 0  # entries harvested so far (the next one is at fetch % entries)
        #: KVM may have written over unharvested entries (the ring was full): set here, the
        #: harvester counts every page dirty once and clears it
        self.suspect = False
        self._skip_reset = False

    def harvest(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, offsets) of the entries KVM pushed since the last harvest, in ring order,
        each marked RESET (call KVM_RESET_DIRTY_RINGS after). Stops at the first empty entry:
        entries are harvested strictly in order, as KVM requires."""
        n = self.entries
        start = self.fetch % n
        if not self._skip_reset and self._flags[start] != c.DIRTY_GFN_F_DIRTY:
            return _EMPTY, _EMPTY  # nothing new (most harvests): no copy of the whole ring
        order = np.concatenate((np.arange(start, n), np.arange(0, start)))
        # flags first (KVM writes an entry, then its flag with release order; x86 keeps our
        # loads in order), then the slot and offset of the dirty ones
        flags = self._flags[order]
        # after a resync, entries already marked RESET (KVM could not recycle them past the
        # overwritten one) are passed over; otherwise the harvest stops at the first entry
        # that is not DIRTY, as KVM requires
        stop = flags == 0 if self._skip_reset else flags != c.DIRTY_GFN_F_DIRTY
        self._skip_reset = False
        count = n if not stop.any() else int(np.argmax(stop))
        if not count:
            return _EMPTY, _EMPTY
        self.fetch += count
        if count > n - RESERVED:
            self.suspect = True  # past KVM's soft limit: it may have written over entries
        idx = order[:count][(flags[:count] & c.DIRTY_GFN_F_RESET) == 0]
        if not idx.size:
            return _EMPTY, _EMPTY
        got = self._ring[idx]
        self._flags[idx] = c.DIRTY_GFN_F_RESET
        return got["slot"].astype(np.int64), got["offset"].astype(np.int64)

    def resync(self) -> bool:
        """Point the harvest back at KVM's oldest pending entry when they fell out of step: KVM
        writes a ring past full when CPL0 code (emulated inside KVM here) writes many pages
        between two entries to the guest, over entries harvested but not yet recycled, and the
        VP then leaves KVM_RUN with its ring "full" while the entry the harvest waits at is
        empty (or holds an entry KVM never recycled). True if it was out of step (pages may be
        lost: the caller counts every page dirty)."""
        n = self.entries
        flags = np.array(self._flags)
        at = self.fetch % n
        pending = flags != 0
        if flags[at] == c.DIRTY_GFN_F_DIRTY or not pending.any():
            return False  # in step (or nothing pending at all)
        if not pending[at]:
            starts = np.flatnonzero(pending & ~np.roll(pending, 1))  # pending after an empty
            self.fetch -= int(((at - starts) % n).min())  # the run ending nearest before `at`
        self.suspect = True
        self._skip_reset = True
        return True

    def close(self) -> None:
        if self._mm is not None:
            del self._ring, self._flags
            if isinstance(self._mm, mmap.mmap):
                self._mm.close()
            self._mm = None


def map_ring(vcpu_fd: int, entries: int) -> DirtyRing:
    """The dirty ring of the vCPU `vcpu_fd`, mapped (the VM's ring enabled with `entries`)."""
    check_entries(entries)
    mm = mmap.mmap(
        vcpu_fd,
        entries * ENTRY_SIZE,
        mmap.MAP_SHARED,
        mmap.PROT_READ | mmap.PROT_WRITE,
        offset=c.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE,
    )
    return DirtyRing(mm, entries)


_EMPTY = np.zeros(0, dtype=np.int64)
