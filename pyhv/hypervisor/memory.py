"""The guest physical address (GPA) space of a partition: RAM regions backed by memfds."""

from __future__ import annotations

import bisect
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from pyhv.kvm import Vm, address_of
from pyhv.kvm import constants as c

PAGE_SIZE = 4096


class GpaError(ValueError):
    """A guest physical address or range that the partition cannot serve."""


@dataclass(eq=False)
class MemoryRegion:
    """A run of guest RAM: `size` bytes at `gpa`, backed by `memfd` at `offset`.

    `memfd` and `host_address` are for the memory manager (e.g. fallocate(PUNCH_HOLE) to release
    pages). A region made from another region's memfd shares its pages.
    """

    gpa: int
    size: int
    readonly: bool
    track_dirty: bool
    slot: int
    memfd: int
    offset: int
    host_address: int
    mm: mmap.mmap = field(repr=False)
    owns_memfd: bool = True
    _vm: Vm | None = field(default=None, repr=False)
    #: The partition's dirty rings' `bitmap` when it logs dirty pages in rings (KVM then refuses
    #: KVM_GET_DIRTY_LOG); None: KVM's bitmap.
    _dirty_source: Callable[[MemoryRegion], bytes] | None = field(default=None, repr=False)
    #: In KVM's memory slots (False: added with register=False, until GpaSpace.register)
    registered: bool = True

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def dirty_bitmap(self) -> bytes:
        """Pages written since the last call (bit n = page n of the region); clears the log."""
        if not self.track_dirty or self._vm is None:
            raise GpaError(
                f"region at {self.gpa:#x} was added without track_dirty=True: add it with "
                "track_dirty=True to read its dirty pages"
            )
        if self._dirty_source is not None:
            return self._dirty_source(self)
        return bytes(self._vm.get_dirty_log(self.slot, self.pages))

    def dirty_pages(self) -> list[int]:
        """GPAs of the pages written since the last call, in order; clears the log."""
        bm = self.dirty_bitmap()
        out = []
        for byte_index, byte in enumerate(bm):
            while byte:
                low = byte & -byte
                page = byte_index * 8 + low.bit_length() - 1
                if page < self.pages:
                    out.append(self.gpa + page * PAGE_SIZE)
                byte ^= low
        return out


def _slot_flags(readonly: bool, track_dirty: bool) -> int:
    return (c.MEM_READONLY if readonly else 0) | (c.MEM_LOG_DIRTY_PAGES if track_dirty else 0)


class GpaSpace:
    """The regions of one partition, sorted by GPA, with slot numbers and bounds checks."""

    def __init__(self, vm: Vm, max_gpa: int, max_slots: int) -> None:
        self._vm = vm
        self.max_gpa = max_gpa
        self._max_slots = max_slots
        self._lock = threading.Lock()
        self._regions: list[MemoryRegion] = []  # sorted by gpa, replaced (not mutated) on change
        #: Called with (gpa, length) before view/read/write touch guest RAM: post-copy migration
        #: fetches missing pages first (a thread holding the GIL cannot wait on a userfault).
        self.before_access: Callable[[int, int], None] | None = None
        #: Where the regions' dirty pages come from when not KVM's bitmap (the dirty rings)
        self.dirty_source: Callable[[MemoryRegion], bytes] | None = None
        self._starts: list[int] = []
        #: Makes the file behind a new region, (name, size) -> fd; None: a memfd. Guest RAM in
        #: 2 MiB pages sets it (pyhv.memory.hugeram).
        self.new_ram_file: Callable[[str, int], int] | None = None

    @property
    def regions(self) -> list[MemoryRegion]:
        return list(self._regions)

    def add(
        self,
        gpa: int,
        size: int,
        readonly: bool = False,
        track_dirty: bool = False,
        memfd: int | None = None,
        offset: int = 0,
        name: str = "pyhv-ram",
        register: bool = True,
    ) -> MemoryRegion:
        """A new region. `register=False`: mapped here but not yet in KVM's memory slots (their
        registration costs ~3 ms per GiB here; a migration's destination takes pages first and
        registers before any VP exists: :meth:`register`)."""
        if gpa % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise GpaError(
                f"region gpa={gpa:#x} size={size:#x}: both must be multiples of 4 KiB and size > 0"
            )
        if gpa < 0 or gpa + size > self.max_gpa:
            raise GpaError(
                f"region {gpa:#x}-{gpa + size:#x} is outside the guest physical address space "
                f"(0-{self.max_gpa:#x})"
            )
        if offset % PAGE_SIZE or offset < 0:
            raise GpaError(f"memfd offset {offset:#x} must be a non-negative multiple of 4 KiB")
        with self._lock:
            for r in self._regions:
                if r.gpa < gpa + size and gpa < r.end:
                    raise GpaError(
                        f"region {gpa:#x}-{gpa + size:#x} overlaps the region {r.gpa:#x}-{r.end:#x}: "
                        "remove that one first or choose another GPA"
                    )
            used = {r.slot for r in self._regions}
            slot = next((i for i in range(self._max_slots) if i not in used), None)
            if slot is None:
                raise GpaError(f"all {self._max_slots} memory slots are in use")
            owns = memfd is None
            if memfd is not None:
                fd = memfd
            elif self.new_ram_file is not None:
                fd = self.new_ram_file(name, size)
            else:
                fd = os.memfd_create(name, os.MFD_CLOEXEC)
            try:
                if owns:
                    os.ftruncate(fd, size)
                elif os.fstat(fd).st_size < offset + size:
                    raise GpaError(
                        f"memfd {fd} holds {os.fstat(fd).st_size:#x} bytes, less than "
                        f"offset+size={offset + size:#x}"
                    )
                mm = mmap.mmap(
                    fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
                )
                host = address_of(mm)
                if register:
                    self._vm.set_user_memory_region(
                        slot, gpa, size, host, _slot_flags(readonly, track_dirty)
                    )
            except BaseException:
                if owns:
                    os.close(fd)
                raise
            region = MemoryRegion(
                gpa,
                size,
                readonly,
                track_dirty,
                slot,
                fd,
                offset,
                host,
                mm,
                owns,
                self._vm,
                self.dirty_source,
                register,
            )
            regions = sorted([*self._regions, region], key=lambda r: r.gpa)
            self._regions, self._starts = regions, [r.gpa for r in regions]
            return region

    def slot_pages(self, slot: int) -> int | None:
        """Pages of the region in memory slot `slot`, None if no region has it."""
        for r in self._regions:
            if r.slot == slot:
                return r.pages
        return None

    def register(self, region: MemoryRegion) -> None:
        """Put a region added with register=False into its KVM memory slot."""
        with self._lock:
            if region not in self._regions:
                raise GpaError(f"region at {region.gpa:#x} is not in this partition")
            if region.registered:
                return
            self._vm.set_user_memory_region(
                region.slot,
                region.gpa,
                region.size,
                region.host_address,
                _slot_flags(region.readonly, region.track_dirty),
            )
            region.registered = True

    def remove(self, region: MemoryRegion) -> None:
        with self._lock:
            if region not in self._regions:
                raise GpaError(f"region at {region.gpa:#x} is not in this partition")
            flags = c.MEM_READONLY if region.readonly else 0
            if region.registered:
                self._vm.set_user_memory_region(region.slot, region.gpa, 0, 0, flags)
            regions = [r for r in self._regions if r is not region]
            self._regions, self._starts = regions, [r.gpa for r in regions]
        region._vm = None
        try:
            region.mm.close()
        except BufferError:
            pass  # a caller still holds a view of it; the mapping goes when that view does
        if region.owns_memfd:
            os.close(region.memfd)

    def find(self, gpa: int) -> MemoryRegion | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self._regions[i]
            if gpa < r.end:
                return r
        return None

    def _region_for(self, gpa: int, n: int) -> MemoryRegion:
        if n < 0:
            raise GpaError(f"length {n} is negative")
        r = self.find(gpa)
        if r is None:
            raise GpaError(f"GPA {gpa:#x} is not backed by RAM in this partition")
        if gpa + n > r.end:
            raise GpaError(
                f"range {gpa:#x}+{n:#x} runs past the end of its region {r.gpa:#x}-{r.end:#x}"
            )
        return r

    def view(self, gpa: int, n: int) -> memoryview:
        r = self._region_for(gpa, n)
        if self.before_access is not None:
            self.before_access(gpa, n)
        off = gpa - r.gpa
        return memoryview(r.mm)[off : off + n]

    def read(self, gpa: int, n: int) -> bytes:
        if self.before_access is not None:
            self.before_access(gpa, n)
        out = bytearray()
        while n > 0:
            r = self.find(gpa)
            if r is None:
                raise GpaError(f"GPA {gpa:#x} is not backed by RAM in this partition")
            take = min(n, r.end - gpa)
            off = gpa - r.gpa
            out += r.mm[off : off + take]
            gpa += take
            n -= take
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        if self.before_access is not None:
            self.before_access(gpa, len(data))
        pos = 0
        while pos < len(data):
            r = self.find(gpa + pos)
            if r is None:
                raise GpaError(f"GPA {gpa + pos:#x} is not backed by RAM in this partition")
            take = min(len(data) - pos, r.end - (gpa + pos))
            off = gpa + pos - r.gpa
            r.mm[off : off + take] = data[pos : pos + take]
            pos += take

    def close(self) -> None:
        for r in list(self._regions):
            self.remove(r)
