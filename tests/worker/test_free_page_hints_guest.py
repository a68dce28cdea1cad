"""Free-page hints with the reference guest (issue 14, item 4): a 1 GiB guest that frees 768 MiB
tells the host in a DM message; the host discards the memory behind it (its memfd blocks fall),
the guest keeps the pages visible and gets fresh zero pages when it writes them again, and the
pages it did not free keep their contents."""

from __future__ import annotations

import os
import re
import time

import numpy as np
import pytest

from pyhv.guest_image import image_path
from tests.support.dm_guest import DmGuest
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB = 1 << 20
PAGE = 4096
FREED_MIB = 768


def _memfd_bytes(g: DmGuest) -> int:
    assert g.vm.partition is not None
    return sum(os.fstat(r.memfd).st_blocks * 512 for r in g.vm.partition.regions)


def _stamped_pages(g: DmGuest) -> set[int]:
    """GPAs of the pages whose first word is their own address (what testlimit writes), read
    with pread: a hole reads as zeros without being allocated."""
    assert g.vm.partition is not None
    found: set[int] = set()
    chunk = 64 * MiB
    for r in g.vm.partition.regions:
        for off in range(0, r.size, chunk):
            n = min(chunk, r.size - off)
            words = np.frombuffer(os.pread(r.memfd, n, r.offset + off), dtype="<u8")[:: PAGE // 8]
            gpas = r.gpa + off + np.arange(len(words), dtype=np.uint64) * PAGE
            found.update(int(x) for x in gpas[words == gpas])
    return found


def _touched(g: DmGuest, task: int, pages: int) -> bool:
    m = re.search(rf"task {task}: .*touched (\d+) pages", g.shell("tasks"))
    return m is not None and int(m.group(1)) >= pages


def _in_huge_pages(g: DmGuest) -> bool:
    """The RAM is in unnamed files on the VM's private tmpfs (pyhv.memory.hugeram), not memfds."""
    assert g.vm.partition is not None
    links = [os.readlink(f"/proc/self/fd/{r.memfd}") for r in g.vm.partition.regions]
    return bool(links) and not any(link.startswith("/memfd:") for link in links)


@pytest.mark.parametrize("huge_pages", [False, True], ids=["4k-memfd", "2m-huge-pages"])
def test_a_1_gib_guest_that_frees_768_mib_gives_it_back_to_the_host(huge_pages: bool) -> None:
    g = DmGuest(
        str(image_path()), startup="1G", minimum="512M", maximum="1G", huge_pages=huge_pages
    )
    try:
        assert _in_huge_pages(g) == huge_pages
        assert wait_for(lambda: g.dm_counters()["free-page-hints"] == "on", 30, "hints on")
        g.use(64)  # task 0: pages the guest keeps
        assert wait_for(lambda: _touched(g, 0, 64 * 256), 60, "task 0 touched its 64 MiB")
        kept = _stamped_pages(g)
        assert len(kept) >= 64 * 256
        g.use(FREED_MIB)  # task 1: the pages it will free
        assert wait_for(lambda: _touched(g, 1, FREED_MIB * 256), 120, "task 1 touched its pages")
        before = _memfd_bytes(g)
        assert before >= (64 + FREED_MIB) * MiB
        hinted = g.dm.counters["hinted_pages"]

        t0 = time.monotonic()
        assert "released" in g.shell("kill 1")
        assert wait_for(
            lambda: before - _memfd_bytes(g) >= (FREED_MIB - 16) * MiB,
            30,
            "the freed memory left the host",
        )
        returned_s = time.monotonic() - t0
        c = g.dm_counters()
        assert g.dm.counters["hinted_pages"] - hinted >= (FREED_MIB - 16) * 256
        assert int(c["hint-refused-ranges"]) == 0
        # the guest still sees all its memory; the host still counts it as the guest's
        st = g.vm.memory_status()
        assert st["visible_pages"] == st["assigned_pages"] == 1024 * 256
        assert g.mem()["visible"] == 1024
        # the pages the guest kept are intact; its pmm is consistent
        assert kept <= _stamped_pages(g)
        assert "pmm: consistent" in g.shell("pmmcheck")
        # and it can use the memory again: fresh pages, written as before
        g.use(FREED_MIB)
        assert wait_for(lambda: _touched(g, 1, FREED_MIB * 256), 120, "the memory used again")
        assert _memfd_bytes(g) >= before - 16 * MiB
        assert len(_stamped_pages(g)) >= len(kept) + FREED_MIB * 256
        print(
            f"hinted {FREED_MIB} MiB, huge_pages={huge_pages} (measured on PVM): kill -> memory off the host "
            f"{returned_s * 1000:.0f} ms (console included); guest's hint round trip "
            f"{c['hint-last-ms']} ms for {int(c['hint-last-pages']) // 256} MiB; host discard "
            f"{g.dm.counters['hint_discard_us'] / 1000:.1f} ms in all"
        )
    finally:
        g.close()


def test_a_balloon_on_ram_in_2_mib_pages_gives_the_host_its_pages_back() -> None:
    """The balloon's ranges need not be whole 2 MiB folios, mapped into KVM or not: the kernel
    splits a folio and frees the pages named."""
    g = DmGuest(str(image_path()), startup="512M", minimum="128M", maximum="512M", huge_pages=True)
    try:
        assert _in_huge_pages(g)
        # hints answered with nothing discarded: the memory the guest frees stays backed, so
        # the balloon's own release is what frees it here
        g.dm.mm.discard = lambda _name, _ranges: 0
        free = g.mem()["free"]
        g.use(free - 16)
        assert wait_for(lambda: _touched(g, 0, (free - 16) * 256), 120, "the guest's memory")
        assert "released" in g.shell("kill")
        before = _memfd_bytes(g)
        assert before >= (512 - 48) * MiB
        # 1 MiB: half of a backed 2 MiB folio, which the kernel splits to free it
        g.target(511 * MiB)
        ballooned = list(g.dm.vsp.ballooned)
        assert sum(r.count for r in ballooned) == 256
        assert any(r.start % 512 or r.count % 512 for r in ballooned), ballooned
        assert before - _memfd_bytes(g) >= 1 * MiB - 16 * PAGE
        g.target(256 * MiB)
        st = g.vm.memory_status()
        assert st["last_error"] is None and st["ballooned_pages"] == 256 * 256
        assert before - _memfd_bytes(g) >= 250 * MiB
        assert _memfd_bytes(g) <= 262 * MiB
        assert "pmm: consistent" in g.shell("pmmcheck")
    finally:
        g.close()


def test_a_vm_in_2_mib_pages_whose_maximum_is_raised_hot_adds_and_uses_the_new_memory() -> None:
    g = DmGuest(str(image_path()), startup="256M", minimum="128M", maximum="256M", huge_pages=True)
    try:
        g.vm.set_memory_limits(128 * MiB, 640 * MiB)
        g.target(640 * MiB)
        assert g.mem()["hot-added"] == 384
        assert _in_huge_pages(g)
        g.use(480)  # reaches into the hot-added regions
        assert wait_for(lambda: _touched(g, 0, 480 * 256), 120, "the hot-added memory used")
        assert _memfd_bytes(g) >= 480 * MiB
        assert "pmm: consistent" in g.shell("pmmcheck")
    finally:
        g.close()


def test_a_guest_hinting_memory_outside_its_ram_or_ballooned_is_refused_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    g = DmGuest(str(image_path()), startup="512M", minimum="256M", maximum="512M")
    try:
        assert wait_for(lambda: g.dm_counters()["free-page-hints"] == "on", 30, "hints on")
        g.target(448 * MiB)  # a balloon, so that a ballooned block can be named
        assert g.vm.memory_status()["ballooned_pages"] == 64 * 256
        before = dict(g.dm.vsp.counters)
        blocks = _memfd_bytes(g)
        assert "3 ranges the host must refuse" in g.shell("dm badhint")
        assert wait_for(
            lambda: g.dm_counters()["hint-refused-ranges"] == "3", 30, "the host's answer"
        )
        vsp = g.dm.vsp
        assert vsp.counters["hint_refused_ranges"] - before.get("hint_refused_ranges", 0) == 3
        assert vsp.counters["refused"] - before.get("refused", 0) == 3
        assert sum("free-page hint" in r.getMessage() for r in caplog.records) >= 3
        # nothing was discarded, the books did not move, and the guest goes on
        assert _memfd_bytes(g) >= blocks - 2 * MiB
        st = g.vm.memory_status()
        assert st["state"] == "IDLE" and st["ballooned_pages"] == 64 * 256
        hinted = g.dm.counters["hinted_pages"]
        g.use(64)
        assert wait_for(lambda: _touched(g, 0, 64 * 256), 60, "task 0 touched its 64 MiB")
        assert "released" in g.shell("kill")
        assert wait_for(
            lambda: g.dm.counters["hinted_pages"] - hinted >= 60 * 256, 30, "a good hint after"
        )
        assert "pmm: consistent" in g.shell("pmmcheck")
    finally:
        g.close()
