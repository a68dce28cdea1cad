"""The worker's Dynamic Memory wiring, end to end against a Python stand-in for the guest's DM
VSC: a real KVM partition and its RAM memfds, the VMBus controller on its ports, the doorbell
ioeventfd served by its thread, the DM VSP, the memory manager and hot-add of a new memory slot.
The stand-in opens the channel through the controller registers (as a VP's port writes would),
keeps its rings in the partition's RAM and rings the doorbell eventfd (as KVM does for a
matched OUT)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.status import MemoryStatus
from pyhv.dynmem.vsp import DmState
from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.vmbus.controller import Command, Reg, Status
from pyhv.worker.config import ConfigError, VmConfig
from pyhv.worker.dynmem import DynamicMemoryError, DynamicMemoryService
from tests.support.guest_ring import GuestRing

pytestmark = pytest.mark.simulation

MiB = 1 << 20
PAGE = 4096
RING_GPA = 0x100000
RING_PAGES = 10  # 5 per direction: a control page and 16 KiB of data, as Linux


class GuestVsc:
    """What the guest's DM driver does, in Python: negotiate, report, balloon, unballoon and
    hot-add against its own page accounting (free pages from 2 MiB up, a floor it keeps)."""

    def __init__(self, svc: DynamicMemoryService, floor_pages: int, hot_add: bool = True) -> None:
        self.svc = svc
        self.ctl = svc.controller
        self.part = svc.partition
        ram = sum(r.size for r in self.part.regions) // PAGE
        self.free = RangeSet([(2 * MiB // PAGE, ram - 2 * MiB // PAGE)])
        self.ballooned = RangeSet()
        self.floor = floor_pages
        self.hot_add = hot_add
        self.committed = 4096
        self.received: list[p.Message] = []
        self.wake = threading.Event()
        self.hostile: dict[str, Any] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)

    def interrupt_for(self, vector: int) -> Any:
        self.vector = vector
        return self.wake.set

    def open(self) -> int:
        area = self.part.view(RING_GPA, RING_PAGES * PAGE)
        half = RING_PAGES // 2 * PAGE
        self.out = GuestRing(area[:half], init=True)
        self.inb = GuestRing(area[half:], init=True)
        for reg, v in [(Reg.SELECT, 0), (Reg.RING_GPA_LO, RING_GPA), (Reg.RING_GPA_HI, 0),
                       (Reg.RING_PAGES, RING_PAGES), (Reg.DOWNSTREAM_PAGES, RING_PAGES // 2),
                       (Reg.VECTOR, 0x50), (Reg.COMMAND, Command.OPEN)]:  # fmt: skip
            self.ctl.io_write(reg, v)
        self._thread.start()
        return self.ctl.io_read(Reg.STATUS)

    def close(self) -> None:
        self._stop = True
        self.wake.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def send(self, mtype: T, body: Any, **kw: Any) -> None:
        self.out.write(p.encode(mtype, body, **kw))
        os.eventfd_write(self.svc._doorbell_fd, 1)  # type: ignore[arg-type]

    def negotiate(self) -> None:
        self.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=1)
        caps = p.DmCapabilities(balloon=1, hot_add=int(self.hot_add), hot_add_alignment=1)
        self.send(T.CAPABILITIES_REPORT, caps, trans_id=2)

    def report(self) -> None:
        self.send(
            T.STATUS_REPORT,
            p.DmStatus(num_committed=self.committed, num_avail=self.free.pages),
        )

    def _run(self) -> None:
        while not self._stop:
            self.wake.wait(0.05)
            self.wake.clear()
            while (pkt := self.inb.read()) is not None:
                msg = p.decode(pkt[3])
                self.received.append(msg)
                self._handle(msg)

    def _handle(self, msg: p.Message) -> None:
        if self.hostile.get("silent"):
            return
        if msg.type is T.BALLOON_REQUEST:
            if "balloon_ranges" in self.hostile:
                ranges = self.hostile.pop("balloon_ranges")
                self.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=ranges)
                return
            n = min(msg.body.num_pages, max(self.free.pages - self.floor, 0))
            got = self.free.take(n)
            for r in got:
                self.ballooned.add(*r)
            self.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=0), ranges=got)
        elif msg.type is T.UNBALLOON_REQUEST:
            for r in msg.ranges:
                self.ballooned.remove(*r)
                self.free.add(*r)
            if not msg.body.more_pages:
                self.send(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
        elif msg.type is T.MEM_HOT_ADD_REQUEST:
            r = msg.body.range
            self.part.write(r.start_page * PAGE, b"hot-added")  # the new slot is RAM now
            self.free.add(r.start_page, r.page_cnt)
            body = p.DmHotAddResponse(page_count=r.page_cnt, result=1)
            self.send(T.MEM_HOT_ADD_RESPONSE, body)


class World:
    def __init__(self, **cfg: Any) -> None:
        from pyhv.hypervisor import Partition
        from pyhv.worker import boot

        self.config = VmConfig.create(image="none", check_image=False, dynamic_memory=True, **cfg)
        self.partition = Partition("dm-test")
        for base, size in boot.ram_regions(self.config.memory):
            self.partition.add_memory(base, size)
        self.statuses: list[MemoryStatus] = []
        self.guest: GuestVsc
        self.svc = DynamicMemoryService(
            self.partition,
            self.config,
            on_status=self.statuses.append,
            interrupt_for=lambda v: self.guest.interrupt_for(v),
            op_timeout=10,
        )
        self.guest = GuestVsc(self.svc, floor_pages=16 * MiB // PAGE)
        self.svc.start()

    def memfd_bytes(self) -> int:
        return sum(os.fstat(r.memfd).st_blocks * 512 for r in self.partition.regions)

    def close(self) -> None:
        self.guest.close()
        self.svc.close()
        self.partition.close()


@pytest.fixture
def world(needs_kvm: None) -> Iterator[World]:  # a real partition: needs /dev/kvm
    w = World(memory="128M", minimum="32M", maximum="256M")
    yield w
    w.close()


def negotiated(world: World) -> World:
    assert world.guest.open() == Status.OK
    world.guest.negotiate()
    assert _until(lambda: world.svc.negotiated)
    return world


def _until(pred: Any, timeout: float = 10.0) -> bool:
    ev = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if pred():
            return True
        ev.wait(0.01)
    return bool(pred())


def test_the_guest_negotiates_version_and_capabilities_and_learns_the_maximum(
    world: World,
) -> None:
    negotiated(world)
    st = world.svc.status()
    assert st["state"] == "IDLE" and st["protocol"] == "2.0"
    assert st["caps"] == {"balloon": True, "hot_add": True, "hot_add_alignment_mib": 2}
    assert _until(lambda: any(m.type is T.INFO_MESSAGE for m in world.guest.received))
    info = next(m for m in world.guest.received if m.type is T.INFO_MESSAGE)
    assert int.from_bytes(info.info[8:16], "little") == 256 * MiB // PAGE
    assert st["visible_pages"] == st["assigned_pages"] == 128 * MiB // PAGE


def test_each_status_report_is_published_with_the_guests_values(world: World) -> None:
    negotiated(world)
    world.guest.committed = 5000
    world.guest.report()
    assert _until(lambda: len(world.statuses) == 1)
    last = world.statuses[0]
    assert last.committed_pages == 5000
    assert last.available_pages == world.guest.free.pages
    assert last.pressure == pytest.approx(5000 * 100 / (128 * MiB // PAGE))
    assert last.assigned_pages == 128 * MiB // PAGE and last.vsp.status_reports == 1
    assert world.svc.status()["committed_pages"] == 5000


def test_a_target_below_assigned_balloons_and_the_host_memory_behind_it_goes_back(
    world: World,
) -> None:
    negotiated(world)
    for off in range(16 * MiB, 128 * MiB, 16 * MiB):  # the guest has used its free RAM once
        world.partition.write(off, b"\x01" * (16 * MiB))
    host_before, pool_before = world.memfd_bytes(), world.svc.mm.free_pages
    plan = world.svc.set_target(96 * MiB)
    assert plan["goal_pages"] == 96 * MiB // PAGE and not plan["clamped"]
    assert world.svc.wait_idle(20)
    st = world.svc.status()
    assert st["last_error"] is None
    assert st["ballooned_pages"] == world.guest.ballooned.pages == 32 * MiB // PAGE
    assert st["assigned_pages"] == 96 * MiB // PAGE and st["visible_pages"] == 128 * MiB // PAGE
    assert host_before - world.memfd_bytes() == 32 * MiB
    assert world.svc.mm.free_pages == pool_before + 32 * MiB // PAGE
    some = next(iter(world.guest.ballooned))
    assert world.partition.read(some.start * PAGE, 8) == bytes(8)  # a hole reads zeros


def test_adding_memory_unballoons_first_then_hot_adds_a_new_slot_above_ram(world: World) -> None:
    negotiated(world)
    world.svc.set_target(96 * MiB)
    assert world.svc.wait_idle(20)
    world.svc.add(64 * MiB // PAGE)  # 32 MiB back from the balloon, 32 MiB hot-added
    assert world.svc.wait_idle(20)
    st = world.svc.status()
    assert st["last_error"] is None
    assert st["ballooned_pages"] == 0 and world.guest.ballooned.pages == 0
    assert st["hot_added_pages"] == 32 * MiB // PAGE
    assert st["visible_pages"] == st["assigned_pages"] == 160 * MiB // PAGE
    regions = [(r.gpa, r.size) for r in world.partition.regions]
    assert regions == [(0, 128 * MiB), (128 * MiB, 32 * MiB)]
    assert world.partition.read(128 * MiB, 9) == b"hot-added"
    unballoons = [m for m in world.guest.received if m.type is T.UNBALLOON_REQUEST]
    hot_adds = [m for m in world.guest.received if m.type is T.MEM_HOT_ADD_REQUEST]
    assert len(unballoons) == 1 and len(hot_adds) == 1
    assert world.guest.received.index(unballoons[0]) < world.guest.received.index(hot_adds[0])


def test_a_target_is_clamped_to_the_configured_minimum_and_maximum(world: World) -> None:
    negotiated(world)
    plan = world.svc.set_target(1 << 40)
    assert plan["clamped"] and plan["goal_pages"] == 256 * MiB // PAGE
    assert world.svc.wait_idle(20)
    assert world.svc.status()["visible_pages"] == 256 * MiB // PAGE
    plan = world.svc.set_target(0)
    assert plan["goal_pages"] == 32 * MiB // PAGE


def test_the_guest_keeps_its_floor_and_the_host_says_so(world: World) -> None:
    negotiated(world)
    world.guest.floor = 100 * MiB // PAGE  # of ~126 MiB free: it gives at most ~26 MiB
    world.svc.set_target(32 * MiB)
    assert world.svc.wait_idle(20)
    st = world.svc.status()
    assert "floor" in st["last_error"]
    assert 0 < st["ballooned_pages"] < 96 * MiB // PAGE
    assert st["ballooned_pages"] == world.guest.ballooned.pages
    assert st["state"] == "IDLE"


def test_requests_are_refused_while_the_guest_has_not_negotiated(world: World) -> None:
    with pytest.raises(DynamicMemoryError, match="not running"):
        world.svc.set_target(64 * MiB)
    with pytest.raises(DynamicMemoryError, match="not running"):
        world.svc.remove(10)
    assert world.svc.status()["counters"]["refused_requests"] == 2


def test_a_hostile_guests_balloon_ranges_are_refused_counted_and_the_worker_goes_on(
    world: World,
) -> None:
    negotiated(world)
    pool = world.svc.mm.free_pages
    world.guest.hostile["balloon_ranges"] = [
        PageRange(1 << 30, 16),  # far outside its RAM
        PageRange(0x7FFF, 4),  # crosses the end of RAM
    ]
    world.svc.remove(256)
    assert world.svc.wait_idle(20)
    st = world.svc.status()
    assert st["bad_ranges"] == 2 and st["bad_messages"] >= 2
    assert st["ballooned_pages"] == 0 and world.svc.mm.free_pages == pool
    # bad controller values from the guest: refused with a status, counted
    world.guest.ctl.io_write(Reg.SELECT, 7)
    world.guest.ctl.io_write(Reg.COMMAND, Command.OPEN)
    assert world.guest.ctl.io_read(Reg.STATUS) == Status.BAD_OFFER
    world.guest.ctl.io_write(Reg.DOORBELL, 99)
    assert world.svc.status()["controller_refused"] == 2
    # and the service still works
    world.svc.remove(256)
    assert world.svc.wait_idle(20)
    assert world.svc.status()["ballooned_pages"] == 256
    assert world.svc.vsp.state is DmState.IDLE


@pytest.mark.unit
def test_dynamic_memory_settings_are_checked_with_clear_messages(tmp_path: Any) -> None:
    image = tmp_path / "guest.elf"
    image.write_bytes(b"")

    def make(**kw: Any) -> VmConfig:
        return VmConfig.create(image=image, **kw)

    c = make(dynamic_memory=True, startup="512M", minimum="256M", maximum="2G")
    assert (c.startup, c.minimum, c.maximum) == (512 * MiB, 256 * MiB, 2048 * MiB)
    assert VmConfig.from_dict(c.to_dict()) == c
    assert make(memory="512M").maximum == 512 * MiB
    with pytest.raises(ConfigError, match="minimum memory 1G must be from 16M up to the startup"):
        make(dynamic_memory=True, startup="512M", minimum="1G")
    with pytest.raises(ConfigError, match="maximum memory 256M must be from the startup"):
        make(dynamic_memory=True, startup="512M", maximum="256M")
    with pytest.raises(ConfigError, match="needs Dynamic Memory"):
        make(memory="512M", maximum="1G")
    with pytest.raises(ConfigError, match="not understood"):
        make(dynamic_memory=True, maximum="lots")


@pytest.mark.unit
def test_pyhv_memory_without_a_running_vm_says_so_without_a_traceback(tmp_path: Any) -> None:
    import subprocess
    import sys

    def memory(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "pyhv.cli", "memory", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    out = memory("--control", str(tmp_path / "none.sock"))
    assert out.returncode == 1 and "no control socket" in out.stderr
    out = memory("--control", str(tmp_path / "none.sock"), "--target", "12 parsecs")
    assert out.returncode == 2 and "not understood" in out.stderr
    (tmp_path / "file").write_text("")
    out = memory("--control", str(tmp_path / "file"))
    assert out.returncode == 1 and "cannot talk to the VM" in out.stderr
    assert not any("Traceback" in o for o in (out.stderr, out.stdout))


def test_a_guest_flooding_status_reports_is_not_passed_on_to_the_vmms(world: World) -> None:
    negotiated(world)
    for _ in range(50):
        world.guest.report()
    assert _until(lambda: world.svc.counters["status_reports"] == 50)
    # each status replaced before it went out is counted; the newest goes out in the end
    assert _until(lambda: world.svc.counters["status_not_published"] + len(world.statuses) == 50)
    assert 1 <= len(world.statuses) < 50


def test_a_guest_that_does_not_answer_is_given_up_on_and_the_vsp_is_ready_again(
    world: World,
) -> None:
    negotiated(world)
    world.svc.op_timeout = 0.3
    world.guest.hostile["silent"] = True
    world.svc.remove(256)
    assert world.svc.wait_idle(20)
    st = world.svc.status()
    assert "did not answer" in st["last_error"] and st["counters"]["timeouts"] == 1
    assert st["state"] == "IDLE" and st["ballooned_pages"] == 0


def test_a_guest_that_reopens_its_channel_gets_its_balloon_back_and_negotiates_again(
    world: World,
) -> None:
    negotiated(world)
    world.svc.remove(1024)
    assert world.svc.wait_idle(20)
    pool = world.svc.mm.free_pages
    world.guest.ctl.io_write(Reg.COMMAND, Command.CLOSE)  # the guest's driver goes away
    assert world.svc.status()["state"] == "STOPPED"
    assert world.guest.ctl.io_read(Reg.STATUS) == Status.OK
    world.guest.close()
    world.guest = GuestVsc(world.svc, floor_pages=16 * MiB // PAGE)  # ... and comes back
    negotiated(world)
    st = world.svc.status()
    assert st["ballooned_pages"] == 0 and world.svc.mm.free_pages == pool - 1024
    assert _until(lambda: any(m.type is T.INFO_MESSAGE for m in world.guest.received))
    world.guest.report()  # more guest traffic: the info message is not sent again
    assert _until(lambda: world.svc.counters["status_reports"] == 1)
    assert sum(m.type is T.INFO_MESSAGE for m in world.guest.received) == 1


def test_memory_hot_added_below_the_apic_hole_continues_above_4_gib(needs_kvm: None) -> None:
    w = World(memory="3000M", minimum="3000M", maximum="3256M")
    try:
        negotiated(w)
        w.svc.set_target(3256 * MiB)
        assert w.svc.wait_idle(20)
        assert w.svc.status()["last_error"] is None
        assert (w.partition.regions[-1].gpa, w.partition.regions[-1].size) == (4 << 30, 256 * MiB)
        assert w.svc.status()["visible_pages"] == 3256 * MiB // PAGE
    finally:
        w.close()


def test_a_packet_written_while_the_host_drains_the_ring_is_not_left_waiting(
    world: World,
) -> None:
    negotiated(world)
    ch = world.svc.offer.channel
    assert ch is not None
    real_commit = ch.reader._commit
    status = p.encode(T.STATUS_REPORT, p.DmStatus(num_committed=7, num_avail=8))

    def commit_late(read: int, consumed: int) -> None:
        # The guest writes between the host's read of write_index and its store of
        # read_index: the ring is not empty to the guest, so it does not ring the doorbell.
        ch.reader._commit = real_commit  # type: ignore[method-assign]
        world.guest.out.write(status)
        real_commit(read, consumed)

    ch.reader._commit = commit_late  # type: ignore[method-assign]
    world.guest.report()  # this one rings
    assert _until(lambda: world.svc.counters["status_reports"] == 2)
    assert world.svc.counters["late_packets"] >= 1
    assert world.svc.status()["committed_pages"] == 7
