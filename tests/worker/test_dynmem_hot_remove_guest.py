"""Hot-remove (DM protocol 2.0) with the reference guest: the host asks for memory back, the
guest's VSC takes whole hot-added regions offline (then free 2 MiB blocks of them) and names them,
the worker's memory manager frees the host memory behind them (a region removed whole leaves
KVM), and Guest Visible Physical Memory falls on both sides. A hot-add the guest accepts in part
is counted as what it took. A guest that names memory the host never asked for is refused,
logged and counted, and it and its neighbours keep running."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhv.counters import CounterRegistry
from pyhv.counters.worker import WorkerCounters
from pyhv.guest_image import image_path
from pyhv.worker.dynmem import DynamicMemoryError
from pyhv.worker.hostmem import resident_bytes
from tests.support.control_vm import control_vm
from tests.support.dm_guest import DmGuest
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB = 1 << 20
PAGES_PER_MIB = 256


@pytest.fixture
def guest() -> Iterator[DmGuest]:
    g = DmGuest(str(image_path()), startup="256M", minimum="128M", maximum="1G")
    yield g
    g.close()


def _grown(g: DmGuest, size: int) -> None:
    """Hot-add up to `size`, and keep what the guest frees on the host (no free-page hints), so
    what a hot-remove gives back shows in host memory."""
    g.target(size)
    assert g.vm.memory_status()["visible_pages"] == size // 4096
    assert "no more free-page hints" in g.shell("dm nohints")


def _agree(g: DmGuest) -> dict[str, int]:
    """The host's books and the guest's own figures say the same memory."""
    st = g.vm.memory_status()
    mem, dm = g.mem(), g.dm_counters()
    assert st["visible_pages"] == mem["visible"] * PAGES_PER_MIB
    assert st["hot_added_pages"] == mem["hot-added"] * PAGES_PER_MIB
    assert st["assigned_pages"] == st["visible_pages"] - st["ballooned_pages"]
    assert st["counters"]["hot_removed_pages"] == int(dm["hot-removed-pages"])
    part = g.dm.mm.partitions[g.vm.config.name]
    assert g.dm.mm.free_pages + part.assigned_pages == g.dm.mm.budget_pages
    assert "pmm: consistent" in g.shell("pmmcheck")
    return st  # type: ignore[no-any-return]


def test_hot_remove_gives_back_a_whole_hot_added_region_and_its_host_memory(
    guest: DmGuest,
) -> None:
    _grown(guest, 640 * MiB)
    assert guest.vm.memory_status()["hot_remove"]
    guest.use(560)  # touches the boot RAM's free memory and most of the hot-added region
    assert wait_for(
        lambda: guest.vm.host_resident_bytes() >= 540 * MiB,
        60,
        "guest.vm.host_resident_bytes() >= 540 * MiB",
    )
    assert "released" in guest.shell("kill")
    resident, pool = guest.vm.host_resident_bytes(), guest.dm.mm.free_pages
    assert resident >= 540 * MiB  # freed in the guest, still backed by the host
    assert guest.vm.partition is not None
    region = guest.vm.partition.regions[-1]
    in_region = resident_bytes(region.host_address, region.size)
    assert region.gpa == 256 * MiB and in_region >= 280 * MiB
    plan = guest.vm.hot_remove_memory()
    assert plan["requested_pages"] == 384 * PAGES_PER_MIB
    assert guest.vm.wait_memory_idle(60)
    st = _agree(guest)
    assert st["visible_pages"] == 256 * PAGES_PER_MIB and st["hot_added_pages"] == 0
    assert st["removed_pages"] == 0  # the region went whole: nothing of it left to account
    assert st["counters"]["hot_removed_pages"] == 384 * PAGES_PER_MIB
    assert guest.dm.mm.free_pages == pool + 384 * PAGES_PER_MIB
    # the region left KVM and the host: its memfd closed, the worker's RSS fell with it
    assert guest.vm.partition is not None
    assert [(r.gpa, r.size) for r in guest.vm.partition.regions if not r.readonly] == [
        (0, 256 * MiB)
    ]
    assert resident - guest.vm.host_resident_bytes() >= in_region - 4 * MiB
    dm = guest.dm_counters()
    assert dm["hot-removed-regions"] == "1" and dm["hot-remove"] == "on"
    # the VMMS hears of it without asking: the last status pushed says the new GVPM
    assert wait_for(
        lambda: guest.reports and guest.reports[-1].visible_pages == 256 * PAGES_PER_MIB,
        10,
        "a status with the new Guest Visible Physical Memory",
    )
    # the guest goes on: it commits and touches memory, and the host can add again
    guest.use(128)
    assert "killed" in guest.shell("kill")
    guest.target(512 * MiB)
    assert _agree(guest)["visible_pages"] == 512 * PAGES_PER_MIB


def test_a_region_in_use_gives_back_its_free_blocks_and_the_books_agree(guest: DmGuest) -> None:
    _grown(guest, 512 * MiB)
    guest.use(480)  # touch it all once ...
    assert wait_for(
        lambda: guest.vm.host_resident_bytes() >= 470 * MiB,
        60,
        "guest.vm.host_resident_bytes() >= 470 * MiB",
    )
    assert "released" in guest.shell("kill")
    guest.use(300)  # ... then keep 300 MiB: the boot RAM and part of the hot-added region
    assert guest.vm.partition is not None
    region = guest.vm.partition.regions[-1]
    assert region.gpa == 256 * MiB
    block = 2 * MiB
    before = [resident_bytes(region.host_address + o, block) for o in range(0, region.size, block)]
    assert sum(before) >= 200 * MiB
    guest.vm.hot_remove_memory(256 * PAGES_PER_MIB)
    assert guest.vm.wait_memory_idle(60)
    st = _agree(guest)
    removed = st["counters"]["hot_removed_pages"]
    assert 0 < removed < 256 * PAGES_PER_MIB and removed % 512 == 0  # whole 2 MiB blocks
    assert st["visible_pages"] == 512 * PAGES_PER_MIB - removed
    assert st["removed_pages"] == removed  # holes in a region that stays mapped
    assert region in guest.vm.partition.regions
    # every removed block left the host: what it held resident is gone, nothing else moved
    offline = guest.dm.mm.partitions[guest.vm.config.name].removed
    gone = [
        (r.start * 4096 - region.gpa) // block + i for r in offline for i in range(r.count // 512)
    ]
    assert len(gone) * 512 == removed
    for i in gone:
        assert resident_bytes(region.host_address + i * block, block) == 0
    assert sum(before[i] for i in gone) >= 32 * MiB  # some of it was backed before
    freed = sum(before) - resident_bytes(region.host_address, region.size)
    assert freed >= sum(before[i] for i in gone) - block
    assert "committed 300 MiB" in guest.shell("tasks")  # the task kept its memory


def test_a_hot_add_the_guest_takes_in_part_is_counted_as_what_it_took(guest: DmGuest) -> None:
    assert "at most 64 MiB" in guest.shell("dm hotaddlimit 64")
    pool = guest.dm.mm.free_pages
    guest.target(512 * MiB)  # 256 MiB offered, 64 MiB taken
    st = _agree(guest)
    assert st["visible_pages"] == st["assigned_pages"] == 320 * PAGES_PER_MIB
    assert st["hot_added_pages"] == 64 * PAGES_PER_MIB
    assert st["counters"]["hot_add_declined_pages"] == 192 * PAGES_PER_MIB
    assert guest.dm.mm.free_pages == pool - 64 * PAGES_PER_MIB
    assert "fewer pages than offered" in st["last_error"]
    # what it took can be given back whole: the region leaves with its declined part
    guest.vm.hot_remove_memory()
    assert guest.vm.wait_memory_idle(60)
    st = _agree(guest)
    assert st["visible_pages"] == 256 * PAGES_PER_MIB and st["removed_pages"] == 0
    assert guest.dm.mm.free_pages == pool


def test_a_region_taken_in_part_gives_only_its_whole_2_mib_blocks_when_the_host_asks_for_them(
    guest: DmGuest,
) -> None:
    assert "at most 3 MiB" in guest.shell("dm hotaddlimit 3")
    guest.target(512 * MiB)  # 256 MiB offered, 3 MiB taken: a block and half of the next
    st = _agree(guest)
    assert st["hot_added_pages"] == 3 * PAGES_PER_MIB
    # the host asks for whole 2 MiB blocks (DM_REMOVE_QOS_LARGE): the guest does not name the
    # region whole (its half block would be refused) but its one whole block
    guest.vm.hot_remove_memory()
    assert guest.vm.wait_memory_idle(60)
    st = _agree(guest)
    vsp = guest.dm.vsp.counters
    assert vsp["hot_remove_bad_ranges"] == 0 and vsp["bad_ranges"] == 0
    assert st["counters"]["hot_removed_pages"] == 512
    assert st["visible_pages"] == 257 * PAGES_PER_MIB  # the half block stays


def test_a_guest_naming_memory_it_was_not_asked_for_is_refused_and_everyone_goes_on(
    guest: DmGuest, caplog: pytest.LogCaptureFixture
) -> None:
    neighbour = DmGuest(str(image_path()), startup="128M", minimum="64M", maximum="256M")
    try:
        _grown(guest, 384 * MiB)
        guest.target(320 * MiB)  # a balloon, so a ballooned block can be named too
        assert "no request outstanding" in guest.shell("dm strayremove")
        assert wait_for(
            lambda: guest.dm.vsp.counters["hot_remove_unasked"] == 1,
            10,
            'guest.dm.vsp.counters["hot_remove_unasked"] == 1',
        )
        assert "must refuse" in guest.shell("dm badremove")
        guest.vm.hot_remove_memory(64 * PAGES_PER_MIB)
        assert guest.vm.wait_memory_idle(60)
        st = _agree(guest)  # the good ranges were taken, nothing else
        assert st["counters"]["hot_removed_pages"] == 64 * PAGES_PER_MIB
        vsp = guest.dm.vsp.counters
        # beyond RAM, twice, ballooned, too many, the ring
        assert vsp["hot_remove_bad_ranges"] >= 5
        assert st["bad_ranges"] >= 5 and st["state"] == "IDLE"
        # the VMMS's Perfmon counters, from the status the worker pushed
        assert wait_for(
            lambda: guest.reports and guest.reports[-1].vsp.hot_remove_refused >= 6,
            10,
            "a pushed status counting the refusals",
        )
        registry = CounterRegistry()
        WorkerCounters(registry).record("vm", guest.reports[-1])
        snap = registry.snapshot()
        assert snap["\\Hyper-V Dynamic Memory VSP(vm)\\Hot-Remove Refusals"] >= 6
        assert snap["\\Hyper-V Dynamic Memory VSP(vm)\\Hot-Removed Pages"] == 64 * PAGES_PER_MIB
        text = " ".join(r.getMessage() for r in caplog.records)
        for why in (
            "no hot-remove request outstanding",
            "named twice",
            "not RAM",
            "ballooned",
            "a VMBus ring",
        ):
            assert why in text, why
        # the guest and its neighbour keep running
        guest.use(32)
        assert "killed" in guest.shell("kill")
        assert "pmm: consistent" in neighbour.shell("pmmcheck")
        assert neighbour.vm.memory_status()["state"] == "IDLE"
        with pytest.raises(DynamicMemoryError, match="busy|minimum|nothing"):
            neighbour.vm.hot_remove_memory()  # no hot-added memory there
    finally:
        neighbour.close()


def test_pyhv_memory_hot_remove_through_the_control_socket(tmp_path: Path) -> None:
    sock = str(tmp_path / "vm.sock")
    with control_vm(
        sock, "--image", str(image_path()), "--dynamic-memory",
        "--startup", "256M", "--minimum", "128M", "--maximum", "512M",
    ) as memory:  # fmt: skip
        assert wait_for(
            lambda: "hot-remove: on" in memory().stdout, 30, '"hot-remove: on" in memory()'
        )
        assert memory("--target", "512M").returncode == 0
        assert wait_for(
            lambda: "visible: 512M" in memory().stdout, 60, '"visible: 512M" in memory()'
        )
        out = memory("--hot-remove", "64M")
        assert out.returncode == 0 and out.stdout.startswith("hot-remove: 64M asked"), out
        assert wait_for(
            lambda: "visible: 448M" in memory().stdout, 60, '"visible: 448M" in memory()'
        )
        assert "hot-remove: on, 64M offline" in memory().stdout  # holes in the mapped region
        out = memory("--hot-remove")  # the rest of the hot-added memory
        assert out.returncode == 0 and "hot-remove: 192M asked" in out.stdout, out
        assert wait_for(
            lambda: "visible: 256M" in memory().stdout, 60, '"visible: 256M" in memory()'
        )
        refused = memory("--hot-remove")  # nothing hot-added is left above the minimum's rules
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert "hot-remove" in refused.stderr
        bad = memory("--hot-remove", "lots")
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
