"""The memory manager takes back what the guest hot-removed: the host memory behind the pages is
freed (memfd holes), the pages go to the pool and out of Guest Visible Physical Memory, and a
hot-added region removed whole is unmapped. A hot-add the guest accepted in part counts what it
took. The removed ranges travel in the saved layout."""

from __future__ import annotations

import os

import pytest

from pyhv.memory.manager import (
    PAGE_SIZE,
    MemfdRegion,
    MemoryManagerError,
    MemoryState,
)
from pyhv.memory.ranges import PageRange
from tests.support.memory_host import Host

pytestmark = pytest.mark.unit

MiB = 1 << 20
RAM_PAGES = 64 * MiB // PAGE_SIZE
BLOCK = 512  # pages in 2 MiB


def _touch(r: MemfdRegion) -> None:
    assert r.mm is not None
    for off in range(0, r.size, PAGE_SIZE):
        r.mm[off] = 0xAB


def _used(r: MemfdRegion) -> int:
    return os.fstat(r.memfd).st_blocks * 512


def test_a_region_removed_whole_is_unmapped_and_its_pages_go_back_to_the_pool(hosts) -> None:
    h = Host(256 * MiB)
    hosts.append(h)
    region = h.mm.hot_add("vm", 32 * MiB // PAGE_SIZE, align_pages=BLOCK)
    _touch(region)  # type: ignore[arg-type]
    pool = h.mm.free_pages
    first = region.gpa // PAGE_SIZE
    n = h.mm.hot_remove("vm", [PageRange(first, 4 * BLOCK)])  # part of it: holes, still mapped
    assert n == 4 * BLOCK and _used(region) == 24 * MiB  # type: ignore[arg-type]
    assert h.part.visible_pages == RAM_PAGES + 12 * BLOCK
    assert h.part.hot_added_pages == 12 * BLOCK and region in h.part.regions
    h.mm.hot_remove("vm", [PageRange(first + 4 * BLOCK, 12 * BLOCK)])  # the rest: unmapped
    assert h.unmapped == [region] and region not in h.part.regions
    assert h.part.visible_pages == RAM_PAGES and h.part.hot_added_pages == 0
    assert h.part.removed.pages == 0  # nothing of it is left to account
    assert h.mm.free_pages == pool + 16 * BLOCK and h.balanced()
    assert h.mm.removed_pages == 16 * BLOCK


def test_boot_ram_pages_removed_leave_holes_and_visible_memory(hosts) -> None:
    h = Host(256 * MiB)
    hosts.append(h)
    boot = h.part.regions[0]
    _touch(boot)  # type: ignore[arg-type]
    h.mm.hot_remove("vm", [PageRange(BLOCK, BLOCK)])
    assert _used(boot) == 62 * MiB  # type: ignore[arg-type]
    assert h.part.visible_pages == h.part.assigned_pages == RAM_PAGES - BLOCK
    assert boot in h.part.regions and h.balanced()


@pytest.mark.parametrize(
    ("ranges", "error"),
    [
        ([PageRange(RAM_PAGES, BLOCK)], "not RAM of partition"),
        ([PageRange(0, BLOCK), PageRange(0, BLOCK)], "named twice"),
        ([PageRange(BLOCK, BLOCK)], "offline"),  # after the first removal below
        ([PageRange(4 * BLOCK, BLOCK)], "ballooned"),
    ],
)
def test_pages_that_are_not_the_guests_to_give_are_refused_and_nothing_changes(
    hosts, ranges: list[PageRange], error: str
) -> None:
    h = Host(256 * MiB)
    hosts.append(h)
    h.mm.hot_remove("vm", [PageRange(BLOCK, BLOCK)])
    h.mm.release("vm", [PageRange(4 * BLOCK, BLOCK)])
    before = (h.mm.free_pages, list(h.part.removed), h.part.visible_pages)
    with pytest.raises(MemoryManagerError, match=error):
        h.mm.hot_remove("vm", ranges)
    assert (h.mm.free_pages, list(h.part.removed), h.part.visible_pages) == before
    # and a balloon or a hint may not name removed pages either
    with pytest.raises(MemoryManagerError, match="offline"):
        h.mm.release("vm", [PageRange(BLOCK, 1)])
    with pytest.raises(MemoryManagerError, match="offline"):
        h.mm.discard("vm", [PageRange(BLOCK, 1)])


def test_a_hot_add_accepted_in_part_counts_only_what_the_guest_took(hosts) -> None:
    h = Host(256 * MiB)
    hosts.append(h)
    pool = h.mm.free_pages
    region = h.mm.hot_add("vm", 16 * BLOCK, align_pages=BLOCK)
    first = region.gpa // PAGE_SIZE
    h.mm.decline_hot_add("vm", PageRange(first + 5 * BLOCK + 7, 11 * BLOCK - 7))
    assert h.part.visible_pages == RAM_PAGES + 5 * BLOCK + 7
    assert h.part.hot_added_pages == 5 * BLOCK + 7
    assert h.mm.free_pages == pool - (5 * BLOCK + 7) and h.balanced()
    assert h.mm.removed_pages == 0  # declined, not removed
    other = h.mm.hot_add("vm", 4 * BLOCK, align_pages=BLOCK)  # none of it accepted: unmapped
    h.mm.decline_hot_add("vm", PageRange(other.gpa // PAGE_SIZE, 4 * BLOCK))
    assert h.unmapped == [other] and h.balanced()


def test_the_removed_ranges_travel_with_the_layout(hosts) -> None:
    src, dst = Host(256 * MiB), Host(256 * MiB)
    hosts += [src, dst]
    region = src.mm.hot_add("vm", 16 * BLOCK, align_pages=BLOCK)
    src.mm.hot_remove("vm", [PageRange(region.gpa // PAGE_SIZE + 8 * BLOCK, 8 * BLOCK)])
    src.mm.hot_remove("vm", [PageRange(2 * BLOCK, BLOCK)])
    src.mm.release("vm", [PageRange(3 * BLOCK, BLOCK)])
    st = MemoryState.from_wire(src.mm.save("vm").to_wire())
    assert st.version == 2 and len(st.removed) == 2
    dst.mm.restore("vm", st)
    assert dst.part.visible_pages == src.part.visible_pages
    assert dst.part.assigned_pages == src.part.assigned_pages
    assert dst.part.hot_added_pages == 8 * BLOCK
    assert list(dst.part.removed) == list(src.part.removed) and dst.balanced()
    with pytest.raises(MemoryManagerError, match="version 1 is not 2"):
        MemoryState.from_wire({**st.to_wire(), "version": 1})


@pytest.mark.parametrize(
    ("removed", "error"),
    [
        ([[RAM_PAGES, BLOCK]], "outside the partition's RAM"),
        ([[0, BLOCK], [0, BLOCK]], "listed twice"),
        ([[3 * BLOCK, BLOCK]], "ballooned"),
    ],
)
def test_a_layout_with_bad_removed_ranges_is_refused_and_nothing_changes(
    hosts, removed: list[list[int]], error: str
) -> None:
    src, dst = Host(256 * MiB), Host(256 * MiB)
    hosts += [src, dst]
    src.mm.release("vm", [PageRange(3 * BLOCK, BLOCK)])
    wire = {**src.mm.save("vm").to_wire(), "removed": removed}
    before = (dst.mm.free_pages, dst.part.visible_pages)
    with pytest.raises(MemoryManagerError, match=error):
        dst.mm.restore("vm", MemoryState.from_wire(wire))
    assert (dst.mm.free_pages, dst.part.visible_pages) == before
