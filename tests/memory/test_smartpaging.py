"""Smart Paging's memory: the range backed by a file is not the pool's until it moves into a
memfd, which keeps every byte the guest wrote at the same host address; the VMMS plans it
only where Dynamic Memory can end it."""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pyhv.kvm import address_of
from pyhv.memory.manager import (
    PAGE_SIZE,
    MemfdRegion,
    MemoryManager,
    MemoryManagerError,
    PoolExhausted,
)
from pyhv.memory.ranges import RangeSet
from pyhv.memory.smartpaging import (
    copy_data,
    move_to_memory,
    new_memory,
    release_file,
)
from pyhv.vmms.config import settings_from_dict
from pyhv.vmms.inventory import Conflict
from pyhv.vmms.smartpaging import SmartPaging

pytestmark = pytest.mark.unit

MiB = 1 << 20
PAGES_PER_MIB = MiB // PAGE_SIZE


@dataclass(eq=False)
class FileRegion:
    """A region backed by a file, as the worker maps the Smart Paging range."""

    gpa: int
    size: int
    memfd: int
    offset: int = 0
    owns_memfd: bool = False
    mm: mmap.mmap = field(init=False, repr=False)
    host_address: int = 0

    def __post_init__(self) -> None:
        self.mm = mmap.mmap(self.memfd, self.size, mmap.MAP_SHARED)
        self.host_address = address_of(self.mm)


@pytest.fixture
def file_region(tmp_path: Path) -> Iterator[FileRegion]:
    fd = os.open(tmp_path / "smart-paging.slp", os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, 8 * MiB)
    r = FileRegion(24 * MiB, 8 * MiB, fd)
    yield r
    r.mm.close()
    if r.owns_memfd:
        os.close(r.memfd)


def test_the_smart_paging_range_is_not_taken_from_the_pool(file_region: FileRegion) -> None:
    low = MemfdRegion(0, 24 * MiB)
    try:
        mm = MemoryManager(64 * MiB)
        p = mm.add_partition("vm", [low, file_region], smart_paging=file_region)
        assert p.smart_paging_pages == 8 * PAGES_PER_MIB
        assert p.assigned_pages == 24 * PAGES_PER_MIB
        assert mm.free_pages == 40 * PAGES_PER_MIB
        # A balloon in the file gives the pool nothing (its pages were never the pool's) and
        # punches the file; one in memory gives the pool its pages.
        file_page = file_region.gpa // PAGE_SIZE
        mm.release("vm", [(file_page, 256), (0x100, 256)])
        assert mm.free_pages == 40 * PAGES_PER_MIB + 256
        assert p.smart_paging_pages == 8 * PAGES_PER_MIB - 256
        assert p.assigned_pages + p.ballooned.pages + p.smart_paging_pages == p.visible_pages
        mm.reclaim("vm", [(file_page, 256)])  # back into the file: the pool is not asked
        assert mm.free_pages == 40 * PAGES_PER_MIB + 256
        with pytest.raises(MemoryManagerError, match="Smart Paging"):
            mm.save("vm")
    finally:
        low.close()


def test_ending_smart_paging_takes_its_pages_from_the_pool_or_refuses(
    file_region: FileRegion,
) -> None:
    low = MemfdRegion(0, 24 * MiB)
    try:
        mm = MemoryManager(28 * MiB)
        p = mm.add_partition("vm", [low, file_region], smart_paging=file_region)
        moved: list[int] = []
        with pytest.raises(PoolExhausted):
            mm.end_smart_paging("vm", lambda r, b: moved.append(1))
        assert moved == [] and p.smart_paging is file_region
        mm.release("vm", [(0, 4 * PAGES_PER_MIB)])
        assert mm.end_smart_paging("vm", lambda r, b: moved.append(1)) == 8 * PAGES_PER_MIB
        assert moved == [1] and p.smart_paging is None and mm.free_pages == 0
        assert p.assigned_pages == 28 * PAGES_PER_MIB
    finally:
        low.close()


def test_the_move_keeps_every_byte_at_the_same_address_and_empties_the_file(
    file_region: FileRegion, tmp_path: Path
) -> None:
    r = file_region
    for off in range(0, r.size, 3 * PAGE_SIZE):  # every third page written, the rest holes
        r.mm[off : off + 8] = (r.gpa + off).to_bytes(8, "little")
    balloon = RangeSet([(r.gpa // PAGE_SIZE + 3, 3)])  # pages 3-5 belong to the host
    address, view = r.host_address, memoryview(r.mm)
    before = bytes(r.mm)
    file_fd = r.memfd
    copied = move_to_memory(r, balloon, "vm")
    release_file(file_fd, 0, r.size)
    written = len(range(0, r.size, 3 * PAGE_SIZE)) - 1  # page 3 is ballooned: not copied
    assert copied == written * PAGE_SIZE and r.owns_memfd and r.host_address == address
    assert os.readlink(f"/proc/self/fd/{r.memfd}").startswith("/memfd:")
    # The memfd holds the written pages only (holes stayed holes), the file nothing.
    assert os.fstat(r.memfd).st_blocks * 512 == copied
    assert (tmp_path / "smart-paging.slp").stat().st_blocks == 0
    after = bytes(view)  # a view taken before the move sees the memory now
    view.release()
    ballooned = range(3 * PAGE_SIZE, 6 * PAGE_SIZE)
    assert [i for i in range(0, r.size, PAGE_SIZE) if i not in ballooned and
            after[i : i + PAGE_SIZE] != before[i : i + PAGE_SIZE]] == []  # fmt: skip
    assert after[3 * PAGE_SIZE : 6 * PAGE_SIZE] == bytes(3 * PAGE_SIZE)
    r.mm[0:8] = b"written!"  # the guest writes on, into the memfd
    assert os.pread(r.memfd, 8, 0) == b"written!"


def test_a_copy_made_while_the_guest_ran_is_completed_by_the_pages_it_wrote_since(
    file_region: FileRegion,
) -> None:
    r = file_region
    for off in range(0, r.size, 2 * PAGE_SIZE):
        r.mm[off : off + 8] = b"first..."
    memfd = new_memory(r, "vm")
    assert copy_data(r, memfd, RangeSet()) == r.size // 2
    # The guest writes on while the copy is made: two pages, one of them a hole before.
    r.mm[0:8], r.mm[PAGE_SIZE : PAGE_SIZE + 8] = b"second..", b"new....."
    expected = bytes(r.mm)
    dirty, file_fd = [r.gpa, r.gpa + PAGE_SIZE], r.memfd
    assert move_to_memory(r, RangeSet(), "vm", memfd=memfd, dirty=dirty) == 2 * PAGE_SIZE
    assert r.memfd == memfd and bytes(r.mm) == expected
    release_file(file_fd, 0, r.size)


class _Pool:
    def __init__(self, free: int) -> None:
        self.free_pages = free


def _settings(**kw: object) -> object:
    return settings_from_dict({"name": "sp", "memory": 512 * MiB, **kw})


def test_smart_paging_is_planned_only_where_dynamic_memory_can_end_it(tmp_path: Path) -> None:
    sp = SmartPaging(tmp_path, object(), dict)
    dm = {"dynamic_memory": True, "minimum": 128 * MiB, "maximum": 512 * MiB}
    free = 384 * PAGES_PER_MIB
    assert sp.plan(_settings(**dm), True, 512 * PAGES_PER_MIB) == 0  # the pool has it all
    assert sp.plan(_settings(**dm), False, free) == 0  # a start: the pool refuses it
    assert sp.plan(_settings(**dm), True, free) == 128 * MiB
    assert sp.plan(_settings(**dm), True, free - 1) == 130 * MiB  # whole 2 MiB blocks
    with pytest.raises(Conflict, match="needs Dynamic Memory"):
        sp.plan(_settings(), True, free)
    with pytest.raises(Conflict, match="needs Dynamic Memory with a minimum below"):
        sp.plan(_settings(**{**dm, "minimum": 512 * MiB}), True, free)
    with pytest.raises(Conflict, match="below its minimum 256M"):
        sp.plan(_settings(**{**dm, "minimum": 256 * MiB}), True, 200 * PAGES_PER_MIB)
    fd, path = sp.open_file("sp", 128 * MiB)
    try:
        st = os.fstat(fd)
        assert path == tmp_path / "sp" / "smart-paging.slp" and st.st_size == 128 * MiB
        assert st.st_blocks == 0 and st.st_mode & 0o777 == 0o600
    finally:
        os.close(fd)


def test_a_worker_on_smart_paging_that_the_vmms_did_not_start_is_taken_on_by_its_file(
    tmp_path: Path,
) -> None:
    """After a VMMS restart, a re-adopted worker's Smart Paging pages are believed only if its
    VM's file is there (the VMMS made it; a jailed worker cannot), and only up to its size."""
    from pyhv.dynmem.status import MemoryStatus

    sp = SmartPaging(tmp_path, object(), dict)
    claim = MemoryStatus(1024, 512, 0, smart_paging_pages=512)
    worker = object()
    assert "given no Smart Paging file" in (sp.refuse_status("vm", claim, worker) or "")
    fd, _path = sp.open_file("vm", 2 * MiB)
    os.close(fd)
    assert sp.refuse_status("vm", claim, worker) is None and sp.in_use("vm")
    too_many = MemoryStatus(1024, 0, 0, smart_paging_pages=1024)
    assert "more than the 512 pages" in (sp.refuse_status("vm", too_many, worker) or "")


def test_smart_paging_lasting_past_minutes_is_warned_about_once_a_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Hyper-V expects Smart Paging to last minutes at most: past WARN_AFTER_S, the VMMS says
    so (with what to do), once a minute, while the pool cannot take the file's pages."""
    import contextlib
    from types import SimpleNamespace

    from pyhv.dynmem.status import MemoryStatus
    from pyhv.vmms import smartpaging

    status = MemoryStatus(1024, 512, 0, smart_paging_pages=512)
    service = SimpleNamespace(
        pool=SimpleNamespace(latest=lambda name: status, free_pages=0),
        balancer=SimpleNamespace(paused=contextlib.nullcontext),
        dm_counters=SimpleNamespace(vm=SimpleNamespace(update=lambda values, name: None)),
    )
    sp = SmartPaging(tmp_path, service, dict)
    sp.give_file("vm", 2 * MiB, SimpleNamespace())
    sp.started("vm", None)
    sp._look("vm")
    assert "run on Smart Paging for" not in caplog.text
    sp._in_use["vm"].started_at -= smartpaging.WARN_AFTER_S + 1
    sp._look("vm")
    sp._look("vm")  # within the minute: not again
    assert caplog.text.count("has run on Smart Paging for 5 min") == 1, caplog.text
    assert "pyhv vm memory vm --minimum SIZE" in caplog.text
    sp.gone("vm")
    assert not (tmp_path / "vm" / "smart-paging.slp").exists()
