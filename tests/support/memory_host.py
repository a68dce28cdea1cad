"""A memory manager without KVM for the memory manager's tests: one partition of 64 MiB startup
RAM at GPA 0 on memfds (MemfdRegion), regions it maps and unmaps recorded."""

from __future__ import annotations

from pyhv.memory.manager import PAGE_SIZE, MemfdRegion, MemoryManager
from pyhv.memory.ranges import PageRange

RAM = 64 << 20
RAM_PAGES = RAM // PAGE_SIZE


class Host:
    """A memory manager of `budget` bytes with partition "vm": 64 MiB startup RAM at GPA 0."""

    def __init__(self, budget: int) -> None:
        self.made: list[MemfdRegion] = []
        self.unmapped: list[MemfdRegion] = []
        self.mm = MemoryManager(budget)
        self.part = self.mm.add_partition(
            "vm", [self._map(0, RAM)], self._map, self.unmapped.append
        )

    def _map(self, gpa: int, size: int) -> MemfdRegion:
        r = MemfdRegion(gpa, size)
        self.made.append(r)
        return r

    def view(self) -> tuple[int, int, list[tuple[int, int]], list[PageRange]]:
        p = self.part
        return (
            self.mm.free_pages,
            p.hot_added_pages,
            [(r.gpa, r.size) for r in p.regions],
            list(p.ballooned),
        )

    def balanced(self) -> bool:
        """The manager's invariant: free + assigned == budget."""
        return self.mm.free_pages + self.part.assigned_pages == self.mm.budget_pages

    def close(self) -> None:
        for r in self.made:
            r.close()
