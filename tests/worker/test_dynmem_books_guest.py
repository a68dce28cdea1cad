"""The balloon's books after a timeout, a reset and a reopen, with the reference guest: the DM
VSP's ballooned ranges, the memory manager's and the guest's own count stay the same pages, and
the host's memory follows them (issue 11, finding 3).

The guest misbehaves on purpose (`dm deaf 1`: it ignores the next unballoon request), so the
host's unballoon times out; then the guest reopens its channel (`dm reopen`: its balloon goes
with the channel, as after a reboot)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from pyhv.guest_image import image_path
from tests.support.dm_guest import DmGuest
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB = 1 << 20
PAGES_PER_MIB = 256
OP_TIMEOUT = 3.0  # seconds the guest has to answer one transaction (60 by default)


class Guest(DmGuest):
    def __init__(self) -> None:
        super().__init__(str(image_path()), startup="512M", minimum="128M", maximum="1G")
        self.dm.op_timeout = OP_TIMEOUT

    def books(self) -> tuple[int, int, int]:
        """Ballooned pages as the VSP, the memory manager and the guest count them."""
        vsp, part = self.dm.vsp, self.dm.mm.partitions[self.dm.name]
        return vsp.ballooned.pages, part.ballooned.pages, int(self.dm_counters()["ballooned"])

    def same_pages(self) -> bool:
        vsp, part = self.dm.vsp, self.dm.mm.partitions[self.dm.name]
        return list(vsp.ballooned) == list(part.ballooned)

    def memfd_bytes(self) -> int:
        """Host memory in the guest RAM's memfds (their allocated blocks)."""
        assert self.vm.partition is not None
        return sum(os.fstat(r.memfd).st_blocks * 512 for r in self.vm.partition.regions)

    def settle(self, size: int) -> dict[str, Any]:
        self.target(size)
        return self.vm.memory_status()  # type: ignore[no-any-return]

    def pool_balances(self) -> bool:
        mm = self.dm.mm
        assigned = sum(p.assigned_pages for p in mm.partitions.values())
        return bool(mm.free_pages + assigned == mm.budget_pages - mm.reserve_pages)


@pytest.fixture
def guest() -> Iterator[Guest]:
    g = Guest()
    yield g
    g.close()


def test_an_unanswered_unballoon_and_a_reopened_channel_leave_the_balloons_books_agreeing(
    guest: Guest,
) -> None:
    # the guest has touched most of its memory once, and lets it go again
    assert "committed" in guest.shell("testlimit -m 400 -c 1")
    assert wait_for(
        lambda: guest.memfd_bytes() >= 400 * MiB, 60, "guest.memfd_bytes() >= 400 * MiB"
    )
    assert "released" in guest.shell("kill")
    st = guest.settle(256 * MiB)
    assert st["last_error"] is None and st["ballooned_pages"] == 256 * PAGES_PER_MIB
    assert guest.books() == (256 * PAGES_PER_MIB,) * 3 and guest.same_pages()

    # the guest ignores the next unballoon: the host reclaims 2 MiB, asks, and times out
    assert "ignoring the next 1" in guest.shell("dm deaf 1")
    timeouts = guest.dm.counters["timeouts"]
    st = guest.settle(258 * MiB)
    assert "did not answer" in st["last_error"], st
    assert guest.dm.counters["timeouts"] == timeouts + 1
    # the host backs those 512 pages now (it reclaimed them first): the VSP says so too, and
    # keeps them apart as unanswered; the guest, which never read the request, still holds them
    assert guest.dm.vsp.unanswered.pages == 512
    assert guest.books() == (255 * PAGES_PER_MIB - 256, 255 * PAGES_PER_MIB - 256, 256 * 256)
    assert guest.same_pages() and guest.pool_balances()
    assert st["assigned_pages"] == 258 * PAGES_PER_MIB
    assert guest.dm_counters()["unballoon-ignored"] == "1"
    assert guest.dm.counters["balloon_checks"] >= 1
    assert guest.dm.counters["balloon_disagreements"] == 0
    # the host holds no more memory than the guest is assigned
    assert guest.memfd_bytes() <= st["assigned_pages"] * 4096

    # the next add unballoons pages the host still holds, not the unanswered ones
    st = guest.settle(300 * MiB)
    assert st["last_error"] is None and st["assigned_pages"] == 300 * PAGES_PER_MIB
    vsp_pages, mm_pages, guest_pages = guest.books()
    assert vsp_pages == mm_pages == (212 * PAGES_PER_MIB) and guest.same_pages()
    assert guest_pages == vsp_pages + 512  # the 512 the guest never took back

    # the guest reopens its channel: its balloon is gone, every page is its own again
    assert "reopened" in guest.shell("dm reopen")
    assert wait_for(
        lambda: guest.dm.negotiated and guest.dm.vsp.counters["resets"] >= 1,
        30,
        "guest.dm.negotiated after the reopen",
    )
    assert guest.books() == (0, 0, 0) and guest.same_pages()
    assert guest.dm.vsp.unanswered.pages == 0
    st = guest.vm.memory_status()
    assert st["assigned_pages"] == st["visible_pages"] == 512 * PAGES_PER_MIB
    assert guest.pool_balances()
    assert guest.dm.counters["balloon_disagreements"] == 0
    assert guest.dm.counters["reclaim_errors"] == 0
    assert guest.memfd_bytes() <= st["assigned_pages"] * 4096
    mem = guest.mem()
    assert mem["ballooned"] == 0 and mem["free"] > 400

    # the guest can use every page it got back: the host backs them as it touches them
    before = guest.memfd_bytes()
    assert "committed" in guest.shell(f"testlimit -m {mem['free'] - 16} -c 1")
    assert wait_for(
        lambda: guest.memfd_bytes() - before >= 100 * MiB,
        60,
        "guest.memfd_bytes() - before >= 100 * MiB",
    )
    assert "pmm: consistent" in guest.shell("pmmcheck")
    assert "released" in guest.shell("kill")

    # and Dynamic Memory goes on: a balloon after the reopen is counted alike on all sides
    st = guest.settle(384 * MiB)
    assert st["last_error"] is None
    assert guest.books() == (128 * PAGES_PER_MIB,) * 3 and guest.same_pages()
    assert guest.memfd_bytes() <= st["assigned_pages"] * 4096
