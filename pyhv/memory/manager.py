"""The hypervisor memory manager: the host's memory budget for partitions and its free pool.

Per partition: its RAM regions (startup RAM and hot-added regions, each backed by a memfd), and
the pages its guest ballooned out. assigned = visible - ballooned. Releasing ballooned pages
punches holes in the memfd, so the host really gets the memory back, and the pages go to the free
pool; unballooning (reclaim) and hot-add take pages from the pool. The invariant, checked by the
tests: free + sum(assigned) == budget - reserve.

`save(name)` gives a partition's layout as a versioned :class:`MemoryState` (hot-added regions,
ballooned ranges); `restore(name, state)` recreates it for the same partition on another host,
checked in full against that partition and the pool before anything is mapped or released.

`discard(name, ranges)` takes the host memory away from pages the guest has freed and keeps
(free-page hints): holes punched as for a balloon, but the pages stay assigned and visible, and
a later guest write gets a fresh zero page.

`hot_remove(name, ranges)` takes pages the guest gave back offline (DM hot-remove): holes punched,
the pages back in the pool and out of Guest Visible Physical Memory (`removed`); a hot-added
region whose every page is removed is unmapped and dropped. `decline_hot_add` does the same for
the part of a hot-added region the guest did not accept, so the books count what it took.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pyhv import wire
from pyhv.memory.ranges import PageRange, RangeSet

PAGE_SIZE = 4096
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)  # libc (find_library would run gcc or ldconfig)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the host pages behind [offset, offset+length) of a memfd; later reads see zeros.

    (MADV_DONTNEED would free nothing on a memfd and leave the old data visible.)
    """
    if _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(
            err, f"fallocate(PUNCH_HOLE) fd={fd} {offset:#x}+{length:#x}: {os.strerror(err)}"
        )


def _still_backed(fd: int, offset: int, length: int) -> bool:
    """Whether [offset, offset+length) of `fd` still holds data (SEEK_DATA finds some)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA) < offset + length
    except OSError:  # ENXIO: no data from offset on
        return False


#: Punches of a ballooned range that still finds it backed (a 2 MiB folio the kernel could not
#: split because something held a transient reference to it) before it is left as it is.
RELEASE_ATTEMPTS = 5


def release_hole(fd: int, offset: int, length: int) -> bool:
    """punch_hole for pages the guest gave up (nobody may touch them again), made sure of: a
    range that covers part of a 2 MiB folio frees nothing if the kernel fails to split the folio
    (it zeroes the range instead; a KVM mapping or a VP's access can hold it a moment), so the
    punch is tried again. Returns False if the pages are still backed after the last try."""
    for attempt in range(RELEASE_ATTEMPTS):
        punch_hole(fd, offset, length)
        if not _still_backed(fd, offset, length):
            return True
        time.sleep(0.001 * (attempt + 1))
    return False


def _overlap(ranges: RangeSet, start: int, count: int) -> int:
    """Pages of `ranges` inside [start, start+count)."""
    end = start + count
    return sum(max(0, min(r.start + r.count, end) - max(r.start, start)) for r in ranges)


class MemoryManagerError(ValueError):
    """A request the memory manager refuses; nothing was changed."""


class PoolExhausted(MemoryManagerError):
    """The free pool holds fewer pages than asked for."""


MEMORY_STATE_VERSION = 2  # 2: the removed ranges (hot-remove, hot-add declined)


def _check_state_version(version: object) -> None:
    if version != MEMORY_STATE_VERSION:
        raise MemoryManagerError(
            f"memory state version {version!r} is not {MEMORY_STATE_VERSION}: the hosts run "
            "different pyhv releases"
        )


def _pairs(what: str, value: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(value, list) or not all(
        isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v) for v in value
    ):
        raise MemoryManagerError(f"memory state: {what} {value!r} is not a list of pairs")
    return tuple((a, b) for a, b in value)


@dataclass(frozen=True)
class MemoryState:
    """One partition's memory as the manager accounts it: its startup RAM and hot-added
    regions as (gpa, size) in bytes, and its ballooned pages (not backed by the host)."""

    version: int
    startup: tuple[tuple[int, int], ...]
    hot_added: tuple[tuple[int, int], ...]
    ballooned: tuple[PageRange, ...]
    #: pages of those regions the guest gave back offline (not visible, not backed)
    removed: tuple[PageRange, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> MemoryState:
        """The shape (types, declared by the fields); restore() checks the values."""
        if isinstance(d, dict) and "version" in d:  # first: another release has other fields
            _check_state_version(d["version"])
        try:
            return wire.from_wire(cls, d, "memory state")
        except ValueError as e:
            raise MemoryManagerError(str(e)) from None


class Backing(Protocol):
    """What the manager needs of a RAM region (pyhv.hypervisor.memory.MemoryRegion has it)."""

    gpa: int
    size: int
    memfd: int
    offset: int


@dataclass(eq=False)
class MemfdRegion:
    """A stand-alone memfd-backed region, for use without a KVM partition (tests, benchmarks)."""

    gpa: int
    size: int
    memfd: int = -1
    offset: int = 0
    mm: mmap.mmap | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.memfd < 0:
            self.memfd = os.memfd_create("pyhv-ram", os.MFD_CLOEXEC)
            os.ftruncate(self.memfd, self.size)
            self.mm = mmap.mmap(self.memfd, self.size)

    def close(self) -> None:
        if self.mm is not None:
            self.mm.close()
        os.close(self.memfd)


@dataclass(eq=False)
class Partition:
    """The memory of one partition, as the memory manager accounts it."""

    name: str
    regions: list[Backing]
    startup_pages: int
    map_region: Callable[[int, int], Backing] | None = None
    ballooned: RangeSet = field(default_factory=RangeSet)
    hot_added_pages: int = 0
    #: How many of `regions` (the first ones) are startup RAM; the rest were hot-added.
    startup_regions: int = 0
    unmap_region: Callable[[Backing], object] | None = None
    #: The Smart Paging range (pyhv.memory.smartpaging): one of `regions`, backed by a file on
    #: disk instead of host memory while the host cannot give the VM all its startup RAM.
    smart_paging: Backing | None = None
    #: Pages of `regions` the guest gave back offline (hot-remove) or never took (a hot-add it
    #: accepted in part): not visible, not backed, never ballooned.
    removed: RangeSet = field(default_factory=RangeSet)

    @property
    def visible_pages(self) -> int:
        """Guest Visible Physical Memory: startup RAM plus every hot-added region, less the
        pages removed."""
        return sum(r.size for r in self.regions) // PAGE_SIZE - self.removed.pages

    @property
    def hot_added_held_pages(self) -> int:
        """Hot-added pages the guest holds: neither removed nor ballooned."""
        return self.hot_added_pages - sum(
            _overlap(self.ballooned, r.gpa // PAGE_SIZE, r.size // PAGE_SIZE)
            for r in self.regions[self.startup_regions :]
        )

    @property
    def smart_paging_pages(self) -> int:
        """Pages of the Smart Paging range the guest has not ballooned: backed by the file."""
        sp = self.smart_paging
        if sp is None:
            return 0
        first, n = sp.gpa // PAGE_SIZE, sp.size // PAGE_SIZE
        return n - _overlap(self.ballooned, first, n) - _overlap(self.removed, first, n)

    @property
    def assigned_pages(self) -> int:
        """Physical Memory: what the host really backs (the Smart Paging file excluded)."""
        return self.visible_pages - self.ballooned.pages - self.smart_paging_pages

    def _host_pages(self, start: int, count: int) -> int:
        """Pages of [start, start+count) backed by host memory (not the Smart Paging file)."""
        sp = self.smart_paging
        if sp is None:
            return count
        lo, hi = (
            max(start, sp.gpa // PAGE_SIZE),
            min(start + count, (sp.gpa + sp.size) // PAGE_SIZE),
        )
        return count - max(0, hi - lo)

    def _split(self, r: PageRange) -> list[tuple[Backing, int, int]]:
        """(region, first page in region, pages) pieces of a range; refuse pages outside RAM."""
        start, count = r
        if count <= 0 or start < 0:
            raise MemoryManagerError(
                f"page range {start:#x}+{count} of {self.name}: need start >= 0 and count > 0"
            )
        pieces = []
        page, left = start, count
        while left:
            reg = next(
                (g for g in self.regions if g.gpa <= page * PAGE_SIZE < g.gpa + g.size), None
            )
            if reg is None:
                raise MemoryManagerError(
                    f"page {page:#x} (GPA {page * PAGE_SIZE:#x}) of range {start:#x}+{count} is "
                    f"not RAM of partition {self.name}"
                )
            first = page - reg.gpa // PAGE_SIZE
            n = min(left, reg.size // PAGE_SIZE - first)
            pieces.append((reg, first, n))
            page += n
            left -= n
        return pieces


class MemoryManager:
    """The host's memory for partitions: a budget, a host reserve and a free pool."""

    def __init__(self, budget_bytes: int, reserve_bytes: int = 0) -> None:
        if budget_bytes % PAGE_SIZE or reserve_bytes % PAGE_SIZE or reserve_bytes > budget_bytes:
            raise MemoryManagerError(
                f"budget {budget_bytes:#x} and reserve {reserve_bytes:#x} must be multiples of "
                "4 KiB with reserve <= budget"
            )
        self.budget_pages = budget_bytes // PAGE_SIZE
        self.reserve_pages = reserve_bytes // PAGE_SIZE
        #: Pages no partition is assigned (excluding the host reserve).
        self.free_pages = self.budget_pages - self.reserve_pages
        self.partitions: dict[str, Partition] = {}
        self.released_pages = 0
        #: ballooned ranges still backed after every release attempt (logged)
        self.release_backed = 0
        self.reclaimed_pages = 0
        self.discarded_pages = 0
        self.removed_pages = 0
        self._lock = threading.Lock()

    def _take(self, pages: int, why: str) -> None:
        if pages > self.free_pages:
            raise PoolExhausted(
                f"{why} needs {pages} pages but the free pool holds {self.free_pages}: "
                "balloon other partitions or lower the request"
            )
        self.free_pages -= pages

    def grow_budget(self, pages: int) -> None:
        """Add `pages` to the budget and the free pool (the budget only grows: a partition's own
        manager whose budget is its maximum, raised while it runs)."""
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
            raise MemoryManagerError(f"budget growth {pages!r} must be a page count >= 0")
        with self._lock:
            self.budget_pages += pages
            self.free_pages += pages

    def add_partition(
        self,
        name: str,
        regions: Iterable[Backing],
        map_region: Callable[[int, int], Backing] | None = None,
        unmap_region: Callable[[Backing], object] | None = None,
        smart_paging: Backing | None = None,
    ) -> Partition:
        """Account a partition's startup RAM (taken from the pool). `map_region(gpa, size)` is
        how hot-add maps a new region into the partition (the worker's GPA space);
        `unmap_region` undoes it (a restore that fails half-way). `smart_paging`, one of
        `regions`, is backed by the Smart Paging file: its pages are not taken from the pool
        until :meth:`end_smart_paging` moves them into memory."""
        regions = sorted(regions, key=lambda r: r.gpa)
        with self._lock:
            if name in self.partitions:
                raise MemoryManagerError(f"partition {name!r} exists: remove it first")
            for a, b in zip(regions, regions[1:], strict=False):
                if a.gpa + a.size > b.gpa:
                    raise MemoryManagerError(f"regions at {a.gpa:#x} and {b.gpa:#x} overlap")
            for r in regions:
                if r.gpa % PAGE_SIZE or r.size % PAGE_SIZE or r.size <= 0:
                    raise MemoryManagerError(f"region {r.gpa:#x}+{r.size:#x}: not 4 KiB aligned")
            self._check_not_shared(regions)
            if smart_paging is not None and smart_paging not in regions:
                raise MemoryManagerError(
                    f"the Smart Paging range at GPA {smart_paging.gpa:#x} is not one of the "
                    f"regions of {name}"
                )
            p = Partition(name, list(regions), 0, map_region, unmap_region=unmap_region)
            p.smart_paging = smart_paging
            p.startup_pages = p.visible_pages
            p.startup_regions = len(regions)
            self._take(p.assigned_pages, f"startup RAM of {name}")
            self.partitions[name] = p
            return p

    def _check_not_shared(self, regions: Iterable[Backing]) -> None:
        """No host page may be handed to two partitions: refuse a memfd range already in use."""
        mine: dict[tuple[int, int], RangeSet] = {}
        for p in self.partitions.values():
            for r in p.regions:
                self._claim(mine, r)
        for r in regions:
            self._claim(mine, r)

    @staticmethod
    def _claim(claimed: dict[tuple[int, int], RangeSet], r: Backing) -> None:
        st = os.fstat(r.memfd)
        s = claimed.setdefault((st.st_dev, st.st_ino), RangeSet())
        first, n = r.offset // PAGE_SIZE, r.size // PAGE_SIZE
        if s.overlaps(first, n):
            raise MemoryManagerError(
                f"region at GPA {r.gpa:#x} uses memfd pages already backing a partition: "
                "give each partition its own memory"
            )
        s.add(first, n)

    def remove_partition(self, name: str) -> int:
        """Return all assigned pages of a partition to the pool; returns how many."""
        with self._lock:
            p = self._get(name)
            del self.partitions[name]
            self.free_pages += p.assigned_pages
            return p.assigned_pages

    def _get(self, name: str) -> Partition:
        try:
            return self.partitions[name]
        except KeyError:
            raise MemoryManagerError(f"no partition {name!r}") from None

    @staticmethod
    def _guests_pages(
        p: Partition, ranges: Iterable[PageRange | tuple[int, int]], refusal: str
    ) -> RangeSet:
        """The ranges as one set (neighbours merged: one fallocate per run), each checked: RAM
        of the partition, not ballooned, not listed twice; MemoryManagerError + `refusal`."""
        batch = RangeSet()
        for r in ranges:
            r = PageRange(*r)
            p._split(r)  # refuses pages that are not RAM of the partition
            if p.removed.overlaps(r.start, r.count):
                raise MemoryManagerError(
                    f"pages {r.start:#x}+{r.count} of {p.name} are offline (hot-removed, or a "
                    "hot-add the guest did not accept): not the guest's RAM any more"
                )
            if p.ballooned.overlaps(r.start, r.count) or batch.overlaps(r.start, r.count):
                raise MemoryManagerError(f"pages {r.start:#x}+{r.count} of {p.name} {refusal}")
            batch.add(r.start, r.count)
        return batch

    def release(self, name: str, ranges: Iterable[PageRange | tuple[int, int]]) -> int:
        """Release the host memory behind ballooned guest pages and put it in the free pool.

        Every range must be RAM of the partition and not released already (checked for all
        ranges before any is released). Returns the number of pages released.
        """
        with self._lock:
            p = self._get(name)
            batch = self._guests_pages(p, ranges, "are already released: a page is released once")
            for run in batch:
                for reg, first, n in p._split(run):
                    if not release_hole(reg.memfd, reg.offset + first * PAGE_SIZE, n * PAGE_SIZE):
                        self.release_backed += 1
                        log.warning(
                            "%s: ballooned pages %#x+%d are still backed on the host (a huge "
                            "page the kernel did not split)",
                            name,
                            reg.gpa // PAGE_SIZE + first,
                            n,
                        )
                    p.ballooned.add(reg.gpa // PAGE_SIZE + first, n)
                    if reg is not p.smart_paging:  # the file's pages were never the pool's
                        self.free_pages += n
            self.released_pages += batch.pages
            return batch.pages

    def discard(self, name: str, ranges: Iterable[PageRange | tuple[int, int]]) -> int:
        """Free the host memory behind pages the guest freed and keeps (a free-page hint): they
        stay assigned (no pool change) and read as zeros. Every range must be RAM of the
        partition and not ballooned (checked for all before any is discarded). Returns pages."""
        with self._lock:
            p = self._get(name)
            batch = self._guests_pages(
                p, ranges, "are ballooned or named twice: only the guest's own pages are discarded"
            )
            for run in batch:
                for reg, first, n in p._split(run):
                    punch_hole(reg.memfd, reg.offset + first * PAGE_SIZE, n * PAGE_SIZE)
            self.discarded_pages += batch.pages
            return batch.pages

    def reclaim(self, name: str, ranges: Iterable[PageRange | tuple[int, int]]) -> int:
        """Give ballooned pages back to the partition (unballoon), taking them from the pool.
        The host backs them again when the guest touches them. Returns the pages reclaimed."""
        with self._lock:
            p = self._get(name)
            batch = RangeSet()
            for r in ranges:
                r = PageRange(*r)
                if r.count <= 0 or not p.ballooned.contains(r.start, r.count):
                    raise MemoryManagerError(
                        f"pages {r.start:#x}+{r.count} of {name} are not ballooned: only "
                        "released pages can be reclaimed"
                    )
                batch.add(r.start, r.count)  # RangeError (a ValueError) if listed twice
            host = sum(p._host_pages(r.start, r.count) for r in batch)
            self._take(host, f"unballooning {name}")
            for r in batch:
                p.ballooned.remove(r.start, r.count)
            self.reclaimed_pages += batch.pages
            return batch.pages

    def pick_ballooned(self, name: str, pages: int) -> list[PageRange]:
        """Up to `pages` ballooned pages of a partition to unballoon, highest first (not
        removed: `reclaim` does that once the guest has them back)."""
        with self._lock:
            p = self._get(name)
            copy = RangeSet(p.ballooned)
            return copy.take(pages)

    def hot_add(self, name: str, pages: int, align_pages: int = 32768) -> Backing:
        """Take `pages` from the pool for a new region above the partition's RAM, aligned to
        `align_pages` (default 128 MiB, the guest's memory block), mapped by `map_region`."""
        with self._lock:
            p = self._get(name)
            if pages <= 0 or align_pages <= 0:
                raise MemoryManagerError(f"hot-add of {pages} pages aligned to {align_pages}")
            if p.map_region is None:
                raise MemoryManagerError(
                    f"partition {name} was added without map_region: it cannot hot-add"
                )
            top = max((r.gpa + r.size for r in p.regions), default=0) // PAGE_SIZE
            start = -(-top // align_pages) * align_pages
            self._take(pages, f"hot-add to {name}")
            try:
                region = p.map_region(start * PAGE_SIZE, pages * PAGE_SIZE)
                self._check_not_shared([region])
            except BaseException:
                self.free_pages += pages
                raise
            p.regions.append(region)
            p.hot_added_pages += pages
            return region

    def hot_remove(self, name: str, ranges: Iterable[PageRange | tuple[int, int]]) -> int:
        """Pages the guest gave back offline (DM hot-remove): their host memory is freed and
        they go to the pool and out of the partition's visible memory; a hot-added region whose
        every page is removed is unmapped. Every range must be RAM of the partition, not
        ballooned, not removed already (checked for all before any changes). Returns pages."""
        with self._lock:
            p = self._get(name)
            batch = self._guests_pages(
                p, ranges, "are ballooned or named twice: a page leaves once"
            )
            self._take_offline(p, batch)
            self.removed_pages += batch.pages
            return batch.pages

    def decline_hot_add(self, name: str, declined: PageRange) -> int:
        """The guest accepted only part of a hot-added region: the rest, `declined`, leaves
        the books as a hot-remove would (a region declined whole is unmapped). Returns pages."""
        with self._lock:
            p = self._get(name)
            batch = self._guests_pages(p, [declined], "are not the guest's to decline")
            self._take_offline(p, batch)
            return batch.pages

    def _take_offline(self, p: Partition, batch: RangeSet) -> None:
        # a hot-added region that goes whole is unmapped: closing its memfd frees the memory,
        # a hole punched first would only double the work
        whole = set()
        if p.unmap_region is not None:
            for reg in p.regions[p.startup_regions :]:
                first, n = reg.gpa // PAGE_SIZE, reg.size // PAGE_SIZE
                if _overlap(p.removed, first, n) + _overlap(batch, first, n) == n:
                    whole.add(id(reg))
        for run in batch:
            for reg, first, n in p._split(run):
                if id(reg) not in whole:
                    punch_hole(reg.memfd, reg.offset + first * PAGE_SIZE, n * PAGE_SIZE)
                p.removed.add(reg.gpa // PAGE_SIZE + first, n)
                if reg is not p.smart_paging:  # the file's pages were never the pool's
                    self.free_pages += n
        for reg in list(p.regions[p.startup_regions :]):
            first, n = reg.gpa // PAGE_SIZE, reg.size // PAGE_SIZE
            if p.removed.contains(first, n):  # all of it offline: unmap it from the partition
                p.removed.remove(first, n)
                p.regions.remove(reg)
                if p.unmap_region is not None:
                    p.unmap_region(reg)
        p.hot_added_pages = sum(
            r.size // PAGE_SIZE - _overlap(p.removed, r.gpa // PAGE_SIZE, r.size // PAGE_SIZE)
            for r in p.regions[p.startup_regions :]
        )

    def end_smart_paging(self, name: str, move: Callable[[Backing, RangeSet], object]) -> int:
        """Smart Paging ends: the pages of the range still in the file are taken from the pool
        and `move(region, ballooned)` puts them in host memory (pyhv.memory.smartpaging); the
        range is ordinary RAM from then on. PoolExhausted (nothing changed) if the pool is
        short; returns the pages taken."""
        with self._lock:
            p = self._get(name)
            sp = p.smart_paging
            if sp is None:
                raise MemoryManagerError(f"partition {name} does not use Smart Paging")
            pages = p.smart_paging_pages
            self._take(pages, f"ending Smart Paging of {name}")
            try:
                move(sp, RangeSet(p.ballooned))
            except BaseException:
                self.free_pages += pages
                raise
            p.smart_paging = None
            return pages

    # --- save / restore -----------------------------------------------------------------------

    def save(self, name: str) -> MemoryState:
        """Partition `name`'s layout: startup RAM, hot-added regions, ballooned ranges."""
        with self._lock:
            p = self._get(name)
            if p.smart_paging is not None:
                raise MemoryManagerError(
                    f"partition {name} runs on Smart Paging ({p.smart_paging_pages} pages in its "
                    "file): its layout is saved once Dynamic Memory has ended it"
                )
            n = p.startup_regions
            return MemoryState(
                MEMORY_STATE_VERSION,
                tuple((r.gpa, r.size) for r in p.regions[:n]),
                tuple((r.gpa, r.size) for r in p.regions[n:]),
                tuple(p.ballooned),
                tuple(p.removed),
            )

    def _check_restore(self, p: Partition, st: MemoryState) -> RangeSet:
        """Every value of `st` against partition `p` and the pool; the RAM pages it would have."""
        _check_state_version(st.version)
        mine = tuple((r.gpa, r.size) for r in p.regions[: p.startup_regions])
        if tuple(st.startup) != mine:
            raise MemoryManagerError(
                f"the state's startup RAM {[(hex(g), hex(n)) for g, n in st.startup]} is not "
                f"partition {p.name}'s {[(hex(g), hex(n)) for g, n in mine]}"
            )
        if len(p.regions) > p.startup_regions or p.ballooned.pages or p.removed.pages:
            raise MemoryManagerError(
                f"partition {p.name} has hot-added or ballooned memory already: a layout is "
                "restored into a partition as it started"
            )
        ram = RangeSet()
        for gpa, size in mine:
            ram.add(gpa // PAGE_SIZE, size // PAGE_SIZE)
        pages = 0
        for gpa, size in st.hot_added:
            if gpa < 0 or size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
                raise MemoryManagerError(
                    f"hot-added region {gpa:#x}+{size:#x}: not 4 KiB aligned with a size > 0"
                )
            if ram.overlaps(gpa // PAGE_SIZE, size // PAGE_SIZE):
                raise MemoryManagerError(
                    f"hot-added region {gpa:#x}+{size:#x} overlaps RAM of partition {p.name}"
                )
            ram.add(gpa // PAGE_SIZE, size // PAGE_SIZE)
            pages += size // PAGE_SIZE
        if pages and p.map_region is None:
            raise MemoryManagerError(f"partition {p.name} was added without map_region")
        if pages > self.free_pages:
            raise PoolExhausted(
                f"the state's {pages} hot-added pages are more than the free pool's "
                f"{self.free_pages} (budget {self.budget_pages} pages): this host cannot hold it"
            )
        balloon = RangeSet()
        for r in st.ballooned:
            if r.count <= 0 or not ram.contains(*r) or balloon.overlaps(*r):
                raise MemoryManagerError(
                    f"ballooned pages {r.start:#x}+{r.count} are empty, outside the partition's "
                    "RAM or listed twice"
                )
            balloon.add(*r)
        removed = RangeSet()
        for r in st.removed:
            if r.count <= 0 or not ram.contains(*r) or balloon.overlaps(*r) or removed.overlaps(*r):
                raise MemoryManagerError(
                    f"removed pages {r.start:#x}+{r.count} are empty, outside the partition's "
                    "RAM, ballooned or listed twice"
                )
            removed.add(*r)
        for gpa, size in st.hot_added:
            if removed.contains(gpa // PAGE_SIZE, size // PAGE_SIZE):
                raise MemoryManagerError(
                    f"hot-added region {gpa:#x}+{size:#x} is removed whole: it would be unmapped"
                )
        return balloon

    def restore(self, name: str, st: MemoryState) -> list[Backing]:
        """Recreate the layout `st` for partition `name` as it started: the hot-added regions
        mapped at the same GPAs (from the pool), the ballooned pages released. Checked in full
        first: if it does not fit, MemoryManagerError and nothing changed. Returns the regions
        mapped."""
        with self._lock:
            p = self._get(name)
            balloon = self._check_restore(p, st)
            added: list[Backing] = []
            try:
                for gpa, size in st.hot_added:
                    assert p.map_region is not None
                    region = p.map_region(gpa, size)
                    added.append(region)
                    self._check_not_shared([region])
            except BaseException:
                for r in added:
                    if p.unmap_region is not None:
                        p.unmap_region(r)
                raise
            pages = sum(size for _gpa, size in st.hot_added) // PAGE_SIZE
            self.free_pages -= pages
            p.regions.extend(added)
            p.hot_added_pages += pages
            for run in balloon:
                for reg, first, n in p._split(run):
                    punch_hole(reg.memfd, reg.offset + first * PAGE_SIZE, n * PAGE_SIZE)
                p.ballooned.add(*run)
                self.free_pages += run.count
            removed = RangeSet(st.removed)
            if removed.pages:
                self._take_offline(p, removed)
            return added
