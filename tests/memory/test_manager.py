"""The hypervisor memory manager: ballooned pages go back to the host for real."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pyhv.memory.manager import (
    PAGE_SIZE,
    MemfdRegion,
    MemoryManager,
    MemoryManagerError,
    PoolExhausted,
)
from pyhv.memory.ranges import PageRange

pytestmark = pytest.mark.unit

MiB = 1 << 20
PAGES_PER_MIB = MiB // PAGE_SIZE


@pytest.fixture
def regions() -> Iterator[list[MemfdRegion]]:
    made: list[MemfdRegion] = []
    yield made
    for r in made:
        r.close()


def ram(regions: list[MemfdRegion], gpa: int, size: int, touch: bool = True) -> MemfdRegion:
    r = MemfdRegion(gpa, size)
    regions.append(r)
    if touch:
        assert r.mm is not None
        for off in range(0, size, PAGE_SIZE):
            r.mm[off] = 0xAB
    return r


def used_bytes(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def balanced(mm: MemoryManager) -> bool:
    assigned = sum(p.assigned_pages for p in mm.partitions.values())
    return mm.free_pages + assigned == mm.budget_pages - mm.reserve_pages


def test_a_balloon_returns_the_guests_pages_to_the_free_pool_and_the_host(regions) -> None:
    r = ram(regions, 0, 32 * MiB)
    mm = MemoryManager(128 * MiB, reserve_bytes=16 * MiB)
    mm.add_partition("vm1", [r])
    assert mm.free_pages == 80 * PAGES_PER_MIB
    before = used_bytes(r.memfd)
    assert before == 32 * MiB
    n = mm.release("vm1", [PageRange(512, 512), PageRange(2048, 1024)])
    assert n == 1536
    assert before - used_bytes(r.memfd) == 1536 * PAGE_SIZE  # the kernel agrees
    assert mm.free_pages == 80 * PAGES_PER_MIB + 1536
    p = mm.partitions["vm1"]
    assert (p.visible_pages, p.assigned_pages) == (8192, 8192 - 1536)
    assert r.mm is not None and r.mm[512 * PAGE_SIZE] == 0  # the guest would read zeros
    assert r.mm[511 * PAGE_SIZE] == 0xAB
    assert balanced(mm)


def test_no_page_is_released_twice(regions) -> None:
    mm = MemoryManager(64 * MiB)
    mm.add_partition("vm1", [ram(regions, 0, 4 * MiB)])
    mm.release("vm1", [(10, 10)])
    with pytest.raises(MemoryManagerError, match="already released"):
        mm.release("vm1", [(0, 11)])
    with pytest.raises(MemoryManagerError, match="already released"):
        mm.release("vm1", [(100, 5), (102, 5)])
    assert mm.partitions["vm1"].ballooned.pages == 10  # a refused batch changes nothing
    assert balanced(mm)


def test_pages_outside_the_partitions_ram_are_refused(regions) -> None:
    mm = MemoryManager(64 * MiB)
    mm.add_partition("vm1", [ram(regions, 0, 1 * MiB), ram(regions, 2 * MiB, 1 * MiB)])
    with pytest.raises(MemoryManagerError, match="not RAM"):
        mm.release("vm1", [(256, 1)])  # the hole between the regions
    with pytest.raises(MemoryManagerError, match="not RAM"):
        mm.release("vm1", [(767, 2)])
    with pytest.raises(MemoryManagerError):
        mm.release("vm1", [(0, 0)])
    assert mm.release("vm1", [(255, 1), (512, 1)]) == 2


def test_unballooning_takes_the_pages_from_the_pool(regions) -> None:
    mm = MemoryManager(16 * MiB)
    mm.add_partition("vm1", [ram(regions, 0, 8 * MiB)])
    mm.release("vm1", [(0, 1024)])
    free = mm.free_pages
    assert mm.pick_ballooned("vm1", 100) == [PageRange(924, 100)]
    assert mm.reclaim("vm1", [(924, 100)]) == 100
    assert mm.free_pages == free - 100
    with pytest.raises(MemoryManagerError, match="not ballooned"):
        mm.reclaim("vm1", [(924, 1)])
    assert mm.partitions["vm1"].assigned_pages == 2048 - 924
    assert balanced(mm)


def test_hot_add_maps_a_new_region_above_ram_from_the_free_pool(regions) -> None:
    mm = MemoryManager(512 * MiB)

    def map_region(gpa: int, size: int) -> MemfdRegion:
        return ram(regions, gpa, size, touch=False)

    mm.add_partition("vm1", [ram(regions, 0, 64 * MiB, touch=False)], map_region)
    reg = mm.hot_add("vm1", 32768)
    assert (reg.gpa, reg.size) == (128 * MiB, 128 * MiB)
    p = mm.partitions["vm1"]
    assert p.visible_pages == 192 * PAGES_PER_MIB and p.hot_added_pages == 32768
    assert mm.free_pages == 320 * PAGES_PER_MIB
    with pytest.raises(PoolExhausted, match="free pool holds"):
        mm.hot_add("vm1", 400 * PAGES_PER_MIB)
    assert balanced(mm)


def test_a_partition_cannot_start_with_memory_the_pool_does_not_have(regions) -> None:
    mm = MemoryManager(32 * MiB, reserve_bytes=8 * MiB)
    mm.add_partition("a", [ram(regions, 0, 16 * MiB, touch=False)])
    with pytest.raises(PoolExhausted):
        mm.add_partition("b", [ram(regions, 0, 16 * MiB, touch=False)])
    assert mm.remove_partition("a") == 16 * PAGES_PER_MIB
    assert mm.free_pages == 24 * PAGES_PER_MIB


def test_memory_is_never_handed_to_two_partitions(regions) -> None:
    mm = MemoryManager(64 * MiB)
    a = ram(regions, 0, 4 * MiB, touch=False)
    mm.add_partition("a", [a])
    with pytest.raises(MemoryManagerError, match="own memory"):
        mm.add_partition("b", [MemfdRegion(0, 4 * MiB, memfd=a.memfd)])


def test_unballooning_is_refused_when_another_partition_took_the_pool(regions) -> None:
    mm = MemoryManager(8 * MiB)
    mm.add_partition("a", [ram(regions, 0, 4 * MiB, touch=False)])
    mm.add_partition(
        "b",
        [ram(regions, 0, 4 * MiB, touch=False)],
        lambda gpa, size: ram(regions, gpa, size, touch=False),
    )
    mm.release("a", [(0, 100)])
    mm.hot_add("b", 50, align_pages=1)
    with pytest.raises(PoolExhausted):
        mm.reclaim("a", [(0, 100)])
    assert mm.partitions["a"].ballooned.pages == 100
    assert mm.reclaim("a", [(0, 50)]) == 50
    assert balanced(mm)


def test_pages_the_guest_freed_leave_the_host_and_stay_the_guests(regions) -> None:
    r = ram(regions, 0, 32 * MiB)
    mm = MemoryManager(128 * MiB)
    mm.add_partition("vm1", [r])
    mm.release("vm1", [PageRange(0, 512)])
    free, before = mm.free_pages, used_bytes(r.memfd)
    assert mm.discard("vm1", [PageRange(1024, 1024)]) == 1024
    assert before - used_bytes(r.memfd) == 1024 * PAGE_SIZE  # the kernel agrees
    p = mm.partitions["vm1"]
    assert mm.free_pages == free and p.assigned_pages == 8192 - 512  # still the guest's
    assert r.mm is not None and r.mm[1024 * PAGE_SIZE] == 0 and r.mm[2048 * PAGE_SIZE] == 0xAB
    for bad in ([PageRange(0, 512)], [PageRange(8192, 512)], [(4096, 512), (4096, 512)]):
        with pytest.raises(MemoryManagerError):
            mm.discard("vm1", bad)  # ballooned, outside RAM, listed twice
    assert mm.discarded_pages == 1024 and balanced(mm)
