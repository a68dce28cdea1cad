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

    def __init__(self, vcpu_fd: int, entries: int) -> None:
        check_entries(entries)
        self.entries = entries
        self._mm = mmap.mmap(
            vcpu_fd,
            entries * ENTRY_SIZE,
            mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE,
            offset=c.DIRTY_LOG_PAGE_OFFSET * mmap.PAGESIZE,
        )
        self._ring = np.frombuffer(self._mm, dtype=GFN)
        self._flags = self._ring["flags"]  # views into the shared mapping
        self.fetch = 0  # entries harvested so far (the next one is at fetch % entries)

    def harvest(self) -> tuple[np.ndarray, np.ndarray]:
        """(slots, offsets) of the entries KVM pushed since the last harvest, in ring order,
        each marked RESET (call KVM_RESET_DIRTY_RINGS after). Stops at the first entry that is
        not DIRTY: entries are harvested strictly in order, as KVM requires."""
        n = self.entries
        start = self.fetch % n
        order = np.concatenate((np.arange(start, n), np.arange(0, start)))
        # flags first (KVM writes an entry, then its flag with release order; x86 keeps our
        # loads in order), then the slot and offset of the dirty ones
        flags = self._flags[order]
        ready = (flags & (c.DIRTY_GFN_F_DIRTY | c.DIRTY_GFN_F_RESET)) == c.DIRTY_GFN_F_DIRTY
        count = n if ready.all() else int(np.argmin(ready))
        if not count:
            return _EMPTY, _EMPTY
        idx = order[:count]
        got = self._ring[idx]
        self._flags[idx] = c.DIRTY_GFN_F_RESET
        self.fetch += count
        return got["slot"].astype(np.int64), got["offset"].astype(np.int64)

    def close(self) -> None:
        if self._mm is not None:
            del self._ring, self._flags
            self._mm.close()
            self._mm = None  # type: ignore[assignment]


_EMPTY = np.zeros(0, dtype=np.int64)
