"""The book's Dynamic Memory story with the reference guest: its VMBus client and DM VSC talk to
the worker's VSP; balloon, unballoon and hot-add move real host memory; the guest's `mem` and
`dm` commands and the host's memfds tell the same story. A hostile test guest throws garbage at
the VMBus controller and its ring, and the worker goes on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhv.dynmem.status import MemoryStatus
from pyhv.guest_image import image_path
from pyhv.worker import VirtualMachine, VmConfig
from pyhv.worker.dynmem import DynamicMemoryError
from pyhv.worker.script import PROMPT
from tests.guests.build import build_test_guest
from tests.support.control_vm import control_vm
from tests.support.dm_guest import DmGuest
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB = 1 << 20
PAGES_PER_MIB = 256


@pytest.fixture(scope="module")
def guest_image() -> str:
    return str(image_path())


Guest = DmGuest


@pytest.fixture
def guest(guest_image: str) -> Iterator[Guest]:
    g = Guest(guest_image, startup="512M", minimum="128M", maximum="1G")
    yield g
    g.close()


def test_the_guest_vsc_negotiates_and_reports_its_memory_every_second(guest: Guest) -> None:
    st = guest.vm.memory_status()
    assert st["state"] == "IDLE" and st["protocol"] == "2.0"
    assert st["caps"]["balloon"] and st["caps"]["hot_add"]
    assert wait_for(lambda: len(guest.reports) >= 3, 30, "len(guest.reports) >= 3")
    c = guest.dm_counters()
    assert c["state"] == "ready" and c["max-page-count"] == str(1024 * PAGES_PER_MIB)
    # the guest is idle: its last report, its `dm` and its `mem` agree (committed is reported
    # as Linux does: committed + ballooned + the balloon floor)
    mem = guest.mem()
    last = guest.vm.memory_status()["last_status"]
    c = guest.dm_counters()
    assert last["committed_pages"] == int(c["last-committed"])
    assert last["available_pages"] == int(c["last-available"])
    assert last["available_pages"] // PAGES_PER_MIB == mem["free"]
    assert last["committed_pages"] > (mem["committed"] + mem["ballooned"]) * PAGES_PER_MIB
    # one report a second of the guest's clock (100 ticks), each one received by the host
    ticks = int(guest.shell("ticks").split()[-1])
    c = guest.dm_counters()
    sent = int(c["status-reports"])
    assert abs(sent - ticks / 100) <= 2, (sent, ticks)
    assert wait_for(
        lambda: guest.dm.counters["status_reports"] >= sent,
        60,
        'guest.dm.counters["status_reports"] >= sent',
    )


def test_ballooning_256_mib_returns_the_host_memory_behind_it_to_the_free_pool(
    guest: Guest,
) -> None:
    free = guest.mem()["free"]
    guest.use(free - 16)  # the guest has touched (nearly) all its free memory once
    assert wait_for(
        lambda: guest.vm.host_resident_bytes() >= (512 - 40) * MiB,
        60,
        "guest.vm.host_resident_bytes() >= (512 - 40) * MiB",
    )
    host_before = guest.vm.host_resident_bytes()
    assert "released" in guest.shell("kill")
    pool_before = guest.dm.mm.free_pages
    guest.target(256 * MiB)
    st = guest.vm.memory_status()
    assert st["last_error"] is None
    assert st["ballooned_pages"] == 256 * PAGES_PER_MIB
    assert st["assigned_pages"] == 256 * PAGES_PER_MIB
    assert guest.mem()["ballooned"] == 256
    # the host memory went (what the guest freed was hinted back, the balloon's pages with it),
    # and the host holds no more than the guest is assigned
    dropped = host_before - guest.vm.host_resident_bytes()
    assert dropped >= 240 * MiB
    assert guest.vm.host_resident_bytes() <= 256 * MiB
    assert guest.dm.mm.free_pages == pool_before + 256 * PAGES_PER_MIB


def test_unballooned_memory_can_be_committed_and_touched_again(guest: Guest) -> None:
    guest.target(256 * MiB)
    assert guest.mem()["ballooned"] == 256
    guest.target(512 * MiB)  # unballoon: the guest gets its pages back
    st = guest.vm.memory_status()
    assert st["ballooned_pages"] == 0 and st["last_error"] is None
    mem = guest.mem()
    assert mem["ballooned"] == 0 and mem["free"] > 256
    host_before = guest.vm.host_resident_bytes()
    guest.use(mem["free"] - 16)
    assert wait_for(
        lambda: guest.vm.host_resident_bytes() - host_before >= 250 * MiB,
        60,
        "guest.vm.host_resident_bytes() - host_before >= 250 * MiB",
    )
    assert "pmm: consistent" in guest.shell("pmmcheck")


def test_hot_add_grows_guest_visible_memory_and_testlimit_can_use_it(guest: Guest) -> None:
    guest.target(768 * MiB)
    st = guest.vm.memory_status()
    assert st["last_error"] is None
    assert st["visible_pages"] == st["assigned_pages"] == 768 * PAGES_PER_MIB
    assert st["hot_added_pages"] == 256 * PAGES_PER_MIB
    assert guest.vm.partition is not None
    assert [(r.gpa, r.size) for r in guest.vm.partition.regions][-1] == (512 * MiB, 256 * MiB)
    mem = guest.mem()
    assert mem["visible"] == 768 and mem["hot-added"] == 256 and mem["free"] > 512
    host_before = guest.vm.host_resident_bytes()
    guest.use(mem["free"] - 16)  # more than the startup RAM had free
    assert wait_for(
        lambda: guest.vm.host_resident_bytes() - host_before >= 600 * MiB,
        60,
        "guest.vm.host_resident_bytes() - host_before >= 600 * MiB",
    )


def test_the_guest_refuses_to_balloon_below_its_floor(guest_image: str) -> None:
    g = Guest(guest_image, startup="256M", minimum="16M", maximum="256M")
    try:
        g.target(16 * MiB)
        st = g.vm.memory_status()
        assert "floor" in st["last_error"]
        assert st["assigned_pages"] > 16 * PAGES_PER_MIB
        assert st["ballooned_pages"] // PAGES_PER_MIB == g.mem()["ballooned"]
        assert st["state"] == "IDLE"
        assert "pmm: consistent" in g.shell("pmmcheck")  # and the guest goes on
    finally:
        g.close()


def test_requests_are_refused_with_a_reason_when_dynamic_memory_is_off(guest_image: str) -> None:
    with VirtualMachine(VmConfig.create(image=guest_image, memory="256M")) as vm:
        vm.start()
        with pytest.raises(DynamicMemoryError, match="not configured with Dynamic Memory"):
            vm.set_memory_target(128 * MiB)


def test_a_hostile_guest_is_refused_logged_counted_and_the_worker_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elf = build_test_guest("vmbus_hostile", tmp_path)
    cfg = VmConfig.create(image=elf, memory="64M", dynamic_memory=True, maximum="128M")
    with VirtualMachine(cfg) as vm:
        vm.start()
        end = vm.wait(120)
        assert end is not None and end.reason == "poweroff", end
        assert end.status == 42, f"the hostile guest stopped at step {end.status}"
        assert b"still standing" in vm.serial.read_until(b"still standing\n", 5)
        st = vm.memory_status()
    assert st["bad_messages"] >= 1  # the DM message that lied about its size
    assert st["controller_refused"] >= 1  # at least the doorbell for channel 99
    assert st["state"] == "STOPPED"  # the corrupt ring closed the channel
    assert "offset8" in (vm.dynmem.vsp.stop_reason or "")  # type: ignore[union-attr]
    assert any("refused" in r.getMessage() for r in caplog.records)
    with pytest.raises(DynamicMemoryError, match="not running"):
        vm.set_memory_target(32 * MiB)


def test_a_worker_process_offers_the_same_memory_calls_and_publishes_each_report(
    guest_image: str,
) -> None:
    from pyhv.worker import WorkerProcess

    reports: list[MemoryStatus] = []
    cfg = VmConfig.create(
        image=guest_image, dynamic_memory=True, startup="256M", minimum="64M", maximum="512M"
    )
    with WorkerProcess(cfg, on_memory_status=reports.append) as vm:
        vm.start()
        vm.serial.read_until(PROMPT, 60)
        assert wait_for(
            lambda: vm.memory_status()["negotiated"], 30, 'vm.memory_status()["negotiated"]'
        )
        assert wait_for(lambda: len(reports) >= 2, 30, "len(reports) >= 2")
        assert reports[-1].committed_pages is not None and reports[-1].committed_pages > 0
        plan = vm.remove_memory(64 * PAGES_PER_MIB)  # the balancer's remove
        assert plan["goal_pages"] == 192 * PAGES_PER_MIB
        assert wait_for(
            lambda: vm.memory_status()["ballooned_pages"] == 64 * PAGES_PER_MIB,
            60,
            'vm.memory_status()["ballooned_pages"] == 64 * PAGES_PER_MIB',
        )
        vm.add_memory(128 * PAGES_PER_MIB)  # unballoon 64 MiB, hot-add 64 MiB
        assert wait_for(
            lambda: vm.memory_status()["visible_pages"] == 320 * PAGES_PER_MIB,
            60,
            'vm.memory_status()["visible_pages"] == 320 * PAGES_PER_MIB',
        )
        st = vm.memory_status()
        assert st["ballooned_pages"] == 0 and st["assigned_pages"] == 320 * PAGES_PER_MIB
        with pytest.raises(DynamicMemoryError, match="integer"):
            vm.add_memory("lots")  # type: ignore[arg-type]


def test_pyhv_memory_shows_and_sets_a_running_vms_memory_through_its_control_socket(
    guest_image: str, tmp_path: Path
) -> None:
    sock = str(tmp_path / "vm.sock")
    with control_vm(
        sock, "--image", guest_image, "--dynamic-memory",
        "--startup", "256M", "--minimum", "64M", "--maximum", "512M",
    ) as memory:  # fmt: skip
        assert wait_for(lambda: "IDLE" in memory().stdout, 30, '"IDLE" in memory().stdout')
        assert wait_for(
            lambda: "last status report: committed" in memory().stdout,
            30,
            '"last status report: committed" in memory().stdout',
        )
        out = memory("--target", "192M")
        assert out.returncode == 0 and out.stdout.startswith("target: 192M"), out
        assert wait_for(
            lambda: "ballooned: 64M" in memory().stdout, 60, '"ballooned: 64M" in memory().stdout'
        )
        assert "assigned: 192M" in memory().stdout
        out = memory("--target", "4G")
        assert "clamped" in out.stdout
        bad = memory("--target", "much")
        assert bad.returncode == 2 and "not understood" in bad.stderr
        assert "Traceback" not in bad.stderr
