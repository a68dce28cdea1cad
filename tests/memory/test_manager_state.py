"""The memory manager saves a partition's layout (hot-added regions, ballooned pages) and
restores it for the same partition on another host: the regions are mapped at the same GPAs
from the pool and the balloon's host memory is released. A layout that does not fit the
partition or the pool is refused, and nothing changes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pyhv.memory.manager import (
    PAGE_SIZE,
    MemfdRegion,
    MemoryManagerError,
    MemoryState,
    PoolExhausted,
)
from pyhv.memory.ranges import PageRange
from tests.support.memory_host import Host

pytestmark = pytest.mark.unit

MiB = 1 << 20
RAM = 64 * MiB
RAM_PAGES = RAM // PAGE_SIZE


def _source(hosts: list[Host]) -> Host:
    src = Host(4 * RAM)
    hosts.append(src)
    src.mm.hot_add("vm", 32 * MiB // PAGE_SIZE, align_pages=RAM_PAGES)
    src.mm.release("vm", [PageRange(0x100, 256), PageRange(RAM_PAGES + 16, 16)])
    return src


def test_a_layout_is_restored_at_the_same_gpas_with_the_balloon_released(
    hosts: list[Host],
) -> None:
    src = _source(hosts)
    st = MemoryState.from_wire(src.mm.save("vm").to_wire())
    assert st.hot_added == ((RAM, 32 * MiB),)
    dst = Host(4 * RAM)
    hosts.append(dst)
    added = dst.mm.restore("vm", st)
    assert [(r.gpa, r.size) for r in added] == [(RAM, 32 * MiB)]
    assert dst.view() == src.view()
    assert dst.mm.save("vm") == st
    # the free pool holds what the source's does: the invariant holds here too
    assert dst.mm.free_pages + dst.part.assigned_pages == dst.mm.budget_pages


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"version": 9}, "version 9 is not 2"),
        ({"startup": ((0, 2 * RAM),)}, "is not partition vm's"),
        ({"hot_added": ((RAM // 2, 32 * MiB),)}, "overlaps RAM"),
        ({"hot_added": ((RAM, 3 * MiB + 5),)}, "not 4 KiB aligned"),
        ({"hot_added": ((RAM, 4 * RAM),)}, "more than the free pool"),
        ({"ballooned": (PageRange(RAM_PAGES + 32 * 256, 1),)}, "outside the partition's RAM"),
        ({"ballooned": (PageRange(0, 10), PageRange(5, 10))}, "listed twice"),
    ],
)
def test_a_layout_that_does_not_fit_is_refused_and_nothing_changes(
    hosts: list[Host], change: dict[str, object], error: str
) -> None:
    st = replace(_source(hosts).mm.save("vm"), **change)  # type: ignore[arg-type]
    dst = Host(4 * RAM)
    hosts.append(dst)
    before = dst.view()
    with pytest.raises(MemoryManagerError, match=error):
        dst.mm.restore("vm", st)
    assert dst.view() == before and dst.made == dst.made[:1]


def test_more_hot_added_pages_than_the_budget_is_refused_as_pool_exhausted(
    hosts: list[Host],
) -> None:
    st = _source(hosts).mm.save("vm")
    small = Host(RAM + 16 * MiB)  # room for startup RAM and 16 of the 32 MiB hot-added
    hosts.append(small)
    before = small.view()
    with pytest.raises(PoolExhausted, match="more than the free pool"):
        small.mm.restore("vm", st)
    assert small.view() == before


def test_a_mapping_that_fails_half_way_is_undone(hosts: list[Host]) -> None:
    src = _source(hosts)
    src.mm.hot_add("vm", 32 * MiB // PAGE_SIZE, align_pages=RAM_PAGES)
    st = src.mm.save("vm")
    dst = Host(4 * RAM)
    hosts.append(dst)
    calls = 0

    def flaky(gpa: int, size: int) -> MemfdRegion:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise MemoryManagerError(f"cannot map {gpa:#x}")
        return dst._map(gpa, size)

    dst.part.map_region = flaky
    before = dst.view()
    with pytest.raises(MemoryManagerError, match="cannot map"):
        dst.mm.restore("vm", st)
    assert dst.view() == before and [r.gpa for r in dst.unmapped] == [RAM]


def test_a_layout_goes_into_a_partition_as_it_started(hosts: list[Host]) -> None:
    src = _source(hosts)
    with pytest.raises(MemoryManagerError, match="as it started"):
        src.mm.restore("vm", src.mm.save("vm"))
    with pytest.raises(
        MemoryManagerError, match="memory state: Object missing required field `version`"
    ):
        MemoryState.from_wire({"startup": []})
