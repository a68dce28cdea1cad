"""The reference guest's VMBus client and Dynamic Memory VSC (guest/vmbus.c, guest/dmvsc.c) under
the worker's real host side (pyhv.worker.dynmem: VMBus controller, doorbell ioeventfd, DM VSP,
memory manager): negotiation, status reports, balloon, unballoon, hot-add, and what the guest
does with values a host should not send."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import DmState, DynamicMemoryVsp
from pyhv.memory.ranges import PageRange
from tests.guest.shell import Shell
from tests.support.floor import floor_pages
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB_PAGES = 256
Boot = Callable[..., Shell]


def dm(shell: Shell) -> dict[str, Any]:
    """The `dm` command's `name: value` lines (numbers as int, the rest as text)."""
    out: dict[str, Any] = {}
    for m in re.finditer(r"^([\w-]+): (.*)$", shell.run("dm"), re.M):
        out[m[1]] = int(m[2]) if m[2].isdigit() else m[2]
    return out


@pytest.fixture
def boot_dm(guest_image: Path) -> Iterator[Callable[..., Shell]]:
    """Boot the guest with Dynamic Memory on and wait until its VSC has negotiated."""
    from pyhv.worker import VirtualMachine, VmConfig

    vms: list[Any] = []

    def boot(memory: str = "256M", minimum: str = "64M", maximum: str = "1G") -> Shell:
        cfg = VmConfig.create(
            image=guest_image,
            memory=memory,
            dynamic_memory=True,
            minimum=minimum,
            maximum=maximum,
        )
        vm = VirtualMachine(cfg)
        vms.append(vm)
        vm.start()
        shell = Shell(vm)
        wait_for(lambda: dm(shell)["state"] == "ready", 60, "the DM VSC is ready")
        wait_for(lambda: vm.dynmem.negotiated, 60, "the host saw the negotiation")
        return shell

    yield boot
    for vm in vms:
        vm.close()


def mem(shell: Shell) -> dict[str, int]:
    return shell.values("mem")


def settle(shell: Shell, target_mib: int) -> dict[str, Any]:
    vm = shell.vm
    vm.set_memory_target(target_mib << 20)
    assert vm.wait_memory_idle(60)
    return vm.memory_status()


def test_the_vsc_negotiates_2_0_and_reports_linux_committed_every_second(boot_dm: Boot) -> None:
    shell = boot_dm("256M")
    d = dm(shell)
    assert d["protocol"].startswith("2.0") and d["bad-messages"] == 0
    vmbus = shell.run("vmbus")
    assert "type 525074dc-8985-46e2-8057-a307dc18a502 open" in vmbus
    assert "10 pages, host->guest from page 5" in vmbus  # 4 + 16 KiB per direction, as Linux
    st = shell.vm.memory_status()
    assert st["protocol"] == "2.0"
    assert st["caps"] == {"balloon": True, "hot_add": True, "hot_add_alignment_mib": 2}
    # the host's info message (protocol 1.0+) told the guest its maximum
    assert d["max-page-count"] == 1 << 18 and d["info-messages"] == 1
    # reports keep coming, and the host got what the guest sent
    first = dm(shell)["status-reports"]
    wait_for(lambda: dm(shell)["status-reports"] >= first + 2, 60, "two more status reports")

    def same() -> bool:
        d = dm(shell)
        s = shell.vm.memory_status()
        return (s["committed_pages"], s["available_pages"]) == (
            d["last-committed"],
            d["last-available"],
        )

    wait_for(same, 60, "the host's last status is the guest's")
    d = dm(shell)
    m = mem(shell)
    # committed + ballooned + floor (hv_balloon), the floor of 256 MiB being 104 MiB
    kernel = d["last-committed"] - floor_pages(256 * MiB_PAGES)
    assert 0 < kernel < 8 * MiB_PAGES and kernel // MiB_PAGES == m["committed"]
    assert abs(d["last-available"] - m["free"] * MiB_PAGES) < MiB_PAGES
    assert shell.vm.dynmem.vsp.counters["refused"] == 0


def test_balloon_unballoon_and_hot_add_move_the_guests_memory(boot_dm: Boot) -> None:
    shell = boot_dm("256M")
    before = mem(shell)
    st = settle(shell, 192)
    m = mem(shell)
    assert m["ballooned"] == 64 and m["free"] == before["free"] - 64 and m["visible"] == 256
    assert st["ballooned_pages"] == 64 * MiB_PAGES and st["last_error"] is None
    d = dm(shell)
    assert d["ballooned"] == 64 * MiB_PAGES and d["balloon-requests"] == 1
    assert d["balloon-responses"] == 1  # 2 MiB runs: a handful of ranges, one message
    assert shell.run("pmmcheck") == "pmm: consistent\n"

    st = settle(shell, 256)
    assert mem(shell) == before and st["ballooned_pages"] == 0
    assert dm(shell)["unballoon-pages"] == 64 * MiB_PAGES

    st = settle(shell, 512)
    m = mem(shell)
    assert m["visible"] == 512 and m["hot-added"] == 256
    assert m["free"] == before["free"] + 256
    assert st["hot_added_pages"] == 256 * MiB_PAGES and st["assigned_pages"] == 512 * MiB_PAGES
    assert dm(shell)["hot-add-pages"] == 256 * MiB_PAGES
    assert shell.run("pmmcheck") == "pmm: consistent\n"
    # the hot-added memory is real: a task commits and touches more than the boot RAM
    assert "committed 400 MiB" in shell.run("testlimit -m 400")
    wait_for(
        lambda: f"touched {400 * MiB_PAGES} pages" in shell.run("tasks"), 60, "400 MiB touched"
    )
    shell.run("kill")
    # and it can be ballooned out again, as any other memory
    st = settle(shell, 300)
    assert st["assigned_pages"] == 300 * MiB_PAGES and mem(shell)["ballooned"] == 212
    assert shell.run("pmmcheck") == "pmm: consistent\n"


def test_the_guest_balloons_no_further_than_its_floor(boot_dm: Boot) -> None:
    shell = boot_dm("256M", minimum="32M")
    assert "committed 100 MiB" in shell.run("testlimit -m 100")
    wait_for(
        lambda: f"touched {100 * MiB_PAGES} pages" in shell.run("tasks"), 60, "100 MiB touched"
    )
    # each request is met down to the floor of that moment; the floor shrinks with the guest
    # (hv_balloon), so the host asks again until the guest answers with no pages at all
    st = settle(shell, 32)
    assert "floor" in (st["last_error"] or "")
    m = mem(shell)
    d = dm(shell)
    assert d["balloon-refused"] > 0 and d["balloon-requests"] > 1
    assert d["ballooned"] == st["ballooned_pages"] > 0
    floor = floor_pages(st["assigned_pages"])
    assert abs(m["free"] * MiB_PAGES - floor) <= MiB_PAGES
    assert st["assigned_pages"] > 32 * MiB_PAGES
    assert "allocated 100 MiB" in shell.run("tasks")  # the workload kept its memory
    assert shell.run("pmmcheck") == "pmm: consistent\n"


@pytest.mark.parametrize(("highest", "want"), [(p.Version.WIN8, "1.0"), (p.Version.WIN7, "0.3")])
def test_the_vsc_falls_back_to_older_protocol_versions(
    boot_dm: Boot, monkeypatch: pytest.MonkeyPatch, highest: int, want: str
) -> None:
    class OldHost(DynamicMemoryVsp):
        def _version(self, msg: p.Message) -> None:
            if self.state is DmState.VERSION and msg.body.version > highest:
                body = p.DmVersionResponse(is_accepted=0)
                self.post(p.encode(T.VERSION_RESPONSE, body, trans_id=msg.trans_id))
                self.accepted()
                self.counters["versions_rejected"] += 1
                return
            super()._version(msg)

    monkeypatch.setattr("pyhv.worker.dynmem.DynamicMemoryVsp", OldHost)
    shell = boot_dm("128M")
    vsp = shell.vm.dynmem.vsp
    assert dm(shell)["protocol"].startswith(want) and vsp.version == highest
    assert vsp.counters["versions_rejected"] == (1 if highest == p.Version.WIN8 else 2)
    assert dm(shell)["info-messages"] == (1 if highest == p.Version.WIN8 else 0)
    assert settle(shell, 96)["ballooned_pages"] == 32 * MiB_PAGES


def test_pages_the_host_never_got_are_not_unballooned(boot_dm: Boot) -> None:
    shell = boot_dm("256M")
    settle(shell, 192)
    before = mem(shell)
    vsp = shell.vm.dynmem.vsp
    bogus = [PageRange(0x100, 16), PageRange(0x8000, 512)]  # the kernel image, free RAM
    with vsp.lock:
        vsp.post(p.encode(T.UNBALLOON_REQUEST, p.DmUnballoonRequest(), ranges=bogus))
    wait_for(lambda: dm(shell)["unballoon-requests"] == 1, 60, "the guest answered")
    d = dm(shell)
    assert d["unballoon-bad-ranges"] == 2 and d["unballoon-pages"] == 0
    assert mem(shell) == before and shell.run("pmmcheck") == "pmm: consistent\n"


def test_a_hot_add_above_64_gib_is_refused_for_good(boot_dm: Boot) -> None:
    shell = boot_dm("128M")
    vsp = shell.vm.dynmem.vsp
    vsp.hot_add(PageRange((64 << 30) // 4096, 512))
    wait_for(lambda: vsp.state is DmState.IDLE, 60, "the guest answered")
    assert vsp.hot_add_disabled  # 0 pages with success: the guest's upper barrier
    d = dm(shell)
    assert d["hot-add-requests"] == 1 and d["hot-add-pages"] == 0 and d["hot-add-failed"] == 1
    assert mem(shell)["visible"] == 128


def test_a_bad_ring_index_from_the_host_closes_the_channel(boot_dm: Boot) -> None:
    shell = boot_dm("128M")
    ring = int(re.search(r"rings at ([0-9a-f]+)", shell.run("vmbus"))[1], 16)  # type: ignore[index]
    host_to_guest = shell.vm.partition.view(ring + 5 * 4096, 4)
    host_to_guest[:4] = (0xFFF0).to_bytes(4, "little")  # write_index beyond the 16 KiB data
    wait_for(lambda: dm(shell)["state"] == "failed", 60, "the guest closed the channel")
    out = shell.run("vmbus")
    assert "closed (the host wrote a bad write_index in the host->guest ring)" in out
    assert shell.vm.dynmem.offer.channel is None  # the host saw the CLOSE
    assert shell.run("pmmcheck") == "pmm: consistent\n"


def fragment_and_balloon(shell: Shell) -> dict[str, Any]:
    """Balloon to the floor, unballoon two pages of every three (runs of 2 pages between
    ballooned single pages), then balloon again: 4 KiB fragments, many messages both ways."""
    settle(shell, 32)
    svc = shell.vm.dynmem
    held = list(svc.mm.partitions[svc.name].ballooned)
    back = [PageRange(s + i, 2) for s, n in held for i in range(0, n - 2, 3)]
    svc.mm.reclaim(svc.name, back)
    svc.vsp.unballoon(back)
    wait_for(lambda: svc.vsp.state is DmState.IDLE, 60, "unballooned")
    d = dm(shell)
    assert d["unballoon-requests"] == -(-len(back) // 510) > 1  # one response after the last
    assert d["unballoon-pages"] == 2 * len(back) and d["unballoon-bad-ranges"] == 0
    assert shell.run("pmmcheck") == "pmm: consistent\n"
    before = dm(shell)["balloon-responses"]
    st = settle(shell, 32)
    d = dm(shell)
    assert d["balloon-responses"] - before > 2  # 510 ranges a message at most
    assert d["ballooned"] == st["ballooned_pages"]
    assert svc.vsp.counters["bad_ranges"] == 0 and svc.vsp.counters["refused"] == 0
    assert shell.run("pmmcheck") == "pmm: consistent\n"
    return st


def ring_counters(shell: Shell) -> dict[str, int]:
    line = next(x for x in shell.run("vmbus").splitlines() if x.strip().startswith("tx "))
    words = line.split()
    return {words[i]: int(words[i + 1]) for i in range(0, len(words), 2)}


def test_fragmented_memory_goes_in_many_messages_both_ways(boot_dm: Boot) -> None:
    """4 KiB fragments: unballoon and balloon take several messages each (more_pages); the
    host's ring fills on the way and the guest wakes it (pending_send_sz) as it reads."""
    shell = boot_dm("128M", minimum="32M", maximum="256M")
    fragment_and_balloon(shell)
    assert ring_counters(shell)["wakeups"] > 0


def test_a_full_ring_waits_for_a_slow_host(boot_dm: Boot, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 KiB rings (one 4 KiB message at a time) and a host that takes its time over each full
    balloon response: the guest finds its ring full, sets pending_send_sz and goes on when
    signalled."""
    from pyhv.vmbus.controller import VmbusController

    offer = VmbusController.offer

    def small_ring(self: VmbusController, *a: Any, **kw: Any) -> Any:
        kw["ring_data_bytes"] = 8192
        return offer(self, *a, **kw)

    class SlowHost(DynamicMemoryVsp):
        def _balloon_response(self, msg: p.Message) -> None:
            if msg.body.more_pages:  # a full message: more follow, and the guest is quicker
                time.sleep(1)
            super()._balloon_response(msg)

    monkeypatch.setattr(VmbusController, "offer", small_ring)
    monkeypatch.setattr("pyhv.worker.dynmem.DynamicMemoryVsp", SlowHost)
    shell = boot_dm("128M", minimum="32M", maximum="256M")
    assert "10 pages" not in shell.run("vmbus") and "6 pages, host->guest from page 3" in shell.run(
        "vmbus"
    )
    fragment_and_balloon(shell)
    c = ring_counters(shell)
    assert c["ring-full"] > 0 and c["wakeups"] > 0


def test_malformed_host_messages_are_counted_and_ignored(boot_dm: Boot) -> None:
    shell = boot_dm("128M")
    svc = shell.vm.dynmem
    hdr = p.DmHeader
    bad = [
        bytes(hdr(type=T.BALLOON_REQUEST, size=100)) + bytes(8),  # says 100 bytes, has 16
        bytes(hdr(type=T.BALLOON_REQUEST, size=24)) + bytes(16),  # a balloon request is 16
        bytes(hdr(type=T.MEM_HOT_REMOVE_REQUEST, size=24)) + bytes(16),  # for 0 pages
        bytes(hdr(type=T.VERSION_RESPONSE, size=16)) + bytes([1]) + bytes(7),  # out of turn
    ]
    with svc.vsp.lock:
        for raw in bad:
            svc.vsp.post(raw)
    channel = svc.offer.channel
    assert channel is not None
    assert channel.try_send(bytes(16), 7, ptype=0xB)  # a completion packet: not used by DM
    wait_for(lambda: dm(shell)["bad-messages"] == len(bad), 60, "all seen")
    wait_for(lambda: ring_counters(shell)["skipped"] == 1, 60, "skipped")
    assert dm(shell)["state"] == "ready"
    assert settle(shell, 96)["ballooned_pages"] == 32 * MiB_PAGES  # and it goes on


def test_the_guest_notices_when_the_host_closes_the_channel(boot_dm: Boot) -> None:
    shell = boot_dm("128M")
    committed = mem(shell)["committed"]
    shell.vm.dynmem.vsp.stop("stopped by the test")  # a stopped VSP closes its channel
    # the next status report stays unread; the guest looks at the offer and lets go
    wait_for(lambda: dm(shell)["state"] == "failed", 120, "the guest let go")
    assert dm(shell)["why"] == "closed by the host"
    assert "closed (closed by the host)" in shell.run("vmbus")
    assert mem(shell)["committed"] <= committed  # the ring pages went back to the pmm
    assert shell.run("pmmcheck") == "pmm: consistent\n"


def test_a_host_that_never_answers_the_version_request_is_given_up_on(
    guest_image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyhv.worker import VirtualMachine, VmConfig

    class MuteHost(DynamicMemoryVsp):
        def _version(self, msg: p.Message) -> None:
            self.accepted()  # heard, never answered

    monkeypatch.setattr("pyhv.worker.dynmem.DynamicMemoryVsp", MuteHost)
    cfg = VmConfig.create(image=guest_image, memory="64M", dynamic_memory=True)
    with VirtualMachine(cfg) as vm:
        vm.start()
        shell = Shell(vm)
        # 5 s of guest ticks, as Linux waits for each answer
        wait_for(lambda: dm(shell)["state"] == "failed", 120, "the guest gave up")
        d = dm(shell)
        assert d["why"] == "no answer to the version request in 5 s" and d["protocol"].startswith(
            "2.0"
        )
        assert shell.values("ticks")["ticks"] >= 500
        assert "mem" in shell.run("help")  # the rest of the guest goes on
