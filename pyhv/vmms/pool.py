"""The host's memory pool as the VMMS accounts it: a `pyhv.memory.MemoryManager` with one
partition per running VM, kept in step with what the workers report.

The guest RAM itself lives in each worker process (its memfds); a worker that exits hands it
back to the kernel. The VMMS's manager mirrors the worker's numbers so the balancer sees the
host's free pool: a started VM takes its startup memory, ballooning returns pages, unballooning
and hot-add take them, and a VM that ends (or whose worker dies) returns everything. Its regions
are sparse placeholder memfds (never touched, so they cost no memory) that give each partition
its own identity for the manager's checks.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

from pyhv.memory.manager import PAGE_SIZE, MemoryManager, MemoryManagerError
from pyhv.memory.ranges import RangeSet

log = logging.getLogger(__name__)

#: Placeholder hot-add regions follow the last region directly: no guest sees their GPAs.
_HOT_ADD_ALIGN_PAGES = 1


@dataclass(eq=False)
class _Placeholder:
    gpa: int
    size: int
    memfd: int
    offset: int = 0


def _placeholder(gpa: int, size: int) -> _Placeholder:
    fd = os.memfd_create("pyhv-vmms-accounting", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return _Placeholder(gpa, size, fd)


def host_memory_bytes() -> int:
    """MemTotal of this host (the default budget)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal not found in /proc/meminfo")


class HostPool:
    """Free pool, reserve and each running VM's assigned memory, in 4 KiB pages."""

    def __init__(self, budget_bytes: int, reserve_bytes: int = 0) -> None:
        budget = budget_bytes // PAGE_SIZE * PAGE_SIZE
        reserve = reserve_bytes // PAGE_SIZE * PAGE_SIZE
        self.manager = MemoryManager(budget, reserve)
        self._lock = threading.Lock()

    @property
    def free_pages(self) -> int:
        """Pages no VM holds, excluding the host reserve (pass as HostMemory(free, 0))."""
        return self.manager.free_pages

    @property
    def reserve_pages(self) -> int:
        return self.manager.reserve_pages

    def admit(self, name: str, startup_bytes: int) -> None:
        """Take a starting VM's startup memory; PoolExhausted (a MemoryManagerError) says how
        much is missing."""
        region = _placeholder(0, startup_bytes)
        try:
            with self._lock:
                self.manager.add_partition(name, [region], map_region=_placeholder)
        except BaseException:
            os.close(region.memfd)
            raise

    def holds(self, name: str) -> bool:
        return name in self.manager.partitions

    def pages(self, name: str) -> tuple[int, int, int]:
        """(visible, assigned, ballooned) pages of a running VM as accounted."""
        p = self.manager.partitions[name]
        return p.visible_pages, p.assigned_pages, p.ballooned.pages

    def give_back(self, name: str) -> int:
        """A VM ended (or its worker died): everything it held returns to the pool."""
        with self._lock:
            p = self.manager.partitions.get(name)
            if p is None:
                return 0
            pages = self.manager.remove_partition(name)
        for r in p.regions:
            os.close(r.memfd)
        return pages

    def sync(self, name: str, visible_pages: int, assigned_pages: int) -> None:
        """Follow the worker's report: hot-added memory, then the balloon's size."""
        with self._lock:
            p = self.manager.partitions.get(name)
            if p is None:
                return
            try:
                grow = visible_pages - p.visible_pages
                if grow > 0:
                    self.manager.hot_add(name, grow, _HOT_ADD_ALIGN_PAGES)
                want = max(0, p.visible_pages - assigned_pages)
                if want > p.ballooned.pages:
                    unballooned = RangeSet(
                        (r.gpa // PAGE_SIZE, r.size // PAGE_SIZE) for r in p.regions
                    )
                    for r in p.ballooned:
                        unballooned.remove(r.start, r.count)
                    self.manager.release(name, unballooned.take(want - p.ballooned.pages))
                elif want < p.ballooned.pages:
                    self.manager.reclaim(
                        name, self.manager.pick_ballooned(name, p.ballooned.pages - want)
                    )
            except MemoryManagerError as e:
                # The worker has the memory already; the pool is short by what it reports.
                log.warning("accounting of %s lags its worker's report: %s", name, e)
