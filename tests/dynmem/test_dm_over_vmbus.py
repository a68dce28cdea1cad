"""The book's Dynamic Memory story on the host side, end to end over real rings in guest memory:
a test guest opens the DM channel through the VMBus controller, negotiates, and balloons."""

from __future__ import annotations

import os
import struct

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import DmState, DynamicMemoryVsp
from pyhv.memory.manager import PAGE_SIZE, MemfdRegion, MemoryManager
from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.vmbus.controller import Command, Reg, VmbusController
from tests.support.guest_ring import open_channel

pytestmark = pytest.mark.simulation

MiB = 1 << 20
RING_GPA = 0x10000


class World:
    def __init__(self) -> None:
        self.region = MemfdRegion(0, 32 * MiB)
        assert self.region.mm is not None
        self.ram = memoryview(self.region.mm)
        for off in range(0, 32 * MiB, PAGE_SIZE):  # the guest has touched all its RAM
            self.ram[off] = 1
        self.mm = MemoryManager(256 * MiB)
        self.added: list[MemfdRegion] = []
        self.mm.add_partition("vm", [self.region], self.map_region)
        self.vsp = DynamicMemoryVsp(
            RangeSet([(0, 32 * MiB // PAGE_SIZE)]),
            assigned_pages=lambda: self.mm.partitions["vm"].assigned_pages,
            on_ballooned=lambda rs: self.mm.release("vm", rs),
            on_reset=lambda rs: self.mm.reclaim("vm", rs),
        )
        self.ctl = VmbusController(
            lambda gpa, size: self.ram[gpa : gpa + size], lambda vector: lambda: None
        )
        self.ctl.offer(p.DM_GUID, self.vsp.bind)
        self.open()

    def open(self) -> None:
        """The guest opens the channel: 4 pages per direction at RING_GPA."""
        self.out, self.inb = open_channel(self.ctl, self.ram, 0, RING_GPA)

    def map_region(self, gpa: int, size: int) -> MemfdRegion:
        self.added.append(MemfdRegion(gpa, size))  # the worker adds a memory slot here
        return self.added[-1]

    def send(self, mtype: T, body: object, **kw: object) -> None:
        self.out.write(p.encode(mtype, body, **kw))  # type: ignore[arg-type]
        self.ctl.io_write(Reg.DOORBELL, 1)

    def receive(self) -> p.Message:
        pkt = self.inb.read()
        assert pkt is not None
        return p.decode(pkt[3])


def test_a_balloon_request_returns_the_guests_pages_to_the_free_pool() -> None:
    w = World()
    w.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=1)
    assert w.receive().body.is_accepted == 1
    w.send(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1, hot_add=1, hot_add_alignment=7))
    assert w.receive().type is T.CAPABILITIES_RESPONSE
    w.send(T.STATUS_REPORT, p.DmStatus(num_committed=4096, num_avail=2048))
    assert w.vsp.last_status is not None and w.vsp.last_status.pressure == 50.0
    free_before = w.mm.free_pages
    used_before = os.fstat(w.region.memfd).st_blocks * 512

    w.vsp.balloon(1024)  # the balancer wants 4 MiB back
    req = w.receive()
    assert req.type is T.BALLOON_REQUEST and req.body.num_pages == 1024
    # the guest VSC allocates two 2 MiB runs and answers in two messages
    w.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=1), ranges=[PageRange(0x1000, 512)])
    w.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=0), ranges=[PageRange(0x1800, 512)])

    assert w.vsp.state is DmState.IDLE
    assert w.mm.free_pages == free_before + 1024
    assert used_before - os.fstat(w.region.memfd).st_blocks * 512 == 4 * MiB
    assert w.mm.partitions["vm"].assigned_pages == 8192 - 1024
    assert struct.unpack_from("<Q", w.ram, 0x1000 * PAGE_SIZE) == (0,)

    # and the add path starts with unballooning: reclaim first, then tell the guest
    back = w.mm.pick_ballooned("vm", 512)
    w.mm.reclaim("vm", back)
    w.vsp.unballoon(back)
    assert w.receive().ranges == tuple(back)
    w.send(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    assert w.vsp.ballooned.pages == 512 and w.vsp.state is DmState.IDLE
    os.close(w.region.memfd)


def test_memory_beyond_the_balloon_comes_from_the_pool_by_hot_add() -> None:
    w = World()
    w.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=1)
    w.send(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1, hot_add=1, hot_add_alignment=7))
    w.receive(), w.receive()
    free = w.mm.free_pages
    region = w.mm.hot_add("vm", 32768)  # 128 MiB at the first 128 MiB boundary above RAM
    first = region.gpa // PAGE_SIZE
    w.vsp.hot_add(PageRange(first, 32768), PageRange(first, 32768))
    req = w.receive()
    assert req.type is T.MEM_HOT_ADD_REQUEST and req.body.range.start_page == first
    w.send(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=32768, result=1))
    part = w.mm.partitions["vm"]
    assert w.mm.free_pages == free - 32768
    assert part.visible_pages == 8192 + 32768 and part.assigned_pages == 8192 + 32768
    assert w.vsp.ram.contains(first, 32768) and w.vsp.state is DmState.IDLE
    # the hot-added pages can be ballooned like any other RAM
    w.vsp.balloon(512)
    w.receive()
    w.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(first, 512)])
    assert part.ballooned.pages == 512
    for r in [w.region, *w.added]:
        os.close(r.memfd)


def test_a_guest_that_reopens_the_channel_starts_over_and_its_balloon_comes_back() -> None:
    w = World()
    w.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=1)
    w.send(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1))
    w.receive(), w.receive()
    w.vsp.balloon(100)
    w.receive()
    w.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x1C00, 100)])
    free = w.mm.free_pages
    w.ctl.io_write(Reg.COMMAND, Command.CLOSE)  # the guest reboots
    assert w.vsp.state is DmState.STOPPED
    w.open()
    assert w.vsp.state is DmState.VERSION and w.vsp.ballooned.pages == 0
    assert w.mm.partitions["vm"].ballooned.pages == 0 and w.mm.free_pages == free - 100
    w.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN8), trans_id=2)
    assert w.receive().body.is_accepted == 1 and w.vsp.state is DmState.CAPS
    os.close(w.region.memfd)


def test_after_an_unanswered_unballoon_the_vsp_and_the_memory_manager_hold_the_same_pages() -> None:
    w = World()
    now = [0.0]
    w.vsp._clock = lambda: now[0]
    w.vsp._reclaim = lambda rs: w.mm.reclaim("vm", rs)
    w.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=1)
    w.send(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1))
    w.receive(), w.receive()
    w.vsp.balloon(1024)
    w.receive()
    w.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x1000, 1024)])
    held = w.mm.partitions["vm"].ballooned
    w.vsp.set_goal(8192 - 512)  # unballoon 512 pages: reclaimed, then asked
    assert w.receive().type is T.UNBALLOON_REQUEST and held.pages == 512
    now[0] += w.vsp.op_timeout  # the guest never answers
    w.vsp.tick()
    assert w.vsp.state is DmState.IDLE and "did not answer" in (w.vsp.goal_error or "")
    assert list(w.vsp.ballooned) == list(held) and w.vsp.unanswered.pages == 512
    # the next step unballoons pages the memory manager still holds
    w.vsp.set_goal(8192 - 256)
    assert w.receive().ranges == (PageRange(0x1000 + 256, 256),)
    w.send(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    assert list(w.vsp.ballooned) == list(held) == [PageRange(0x1000, 256)]
    # a late answer to the unanswered request settles it; a second one is refused
    w.send(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    assert w.vsp.unanswered.pages == 0 and w.vsp.counters["late_unballoon_responses"] == 1
    refused = w.vsp.counters["refused"]
    w.send(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    assert w.vsp.counters["refused"] == refused + 1
    # a reopened channel gives the rest back on both sides
    w.ctl.io_write(Reg.COMMAND, Command.CLOSE)
    w.open()
    assert w.vsp.ballooned.pages == held.pages == 0
    assert w.mm.partitions["vm"].assigned_pages == 8192
    os.close(w.region.memfd)


def test_free_page_hints_are_offered_only_by_a_host_that_discards_and_refused_otherwise() -> None:
    w = World()  # a VSP without on_hinted: it does not offer hints
    hint = [PageRange(0x1000, 512)]
    w.send(T.FREE_PAGE_HINT, p.DmFreePageHint(), ranges=hint)  # before negotiation
    assert w.vsp.counters["refused"] == 1
    w.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=1)
    w.send(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1))
    assert w.receive().type is T.VERSION_RESPONSE
    assert w.receive().body.free_page_hints == 0
    w.send(T.FREE_PAGE_HINT, p.DmFreePageHint(), ranges=hint)
    assert w.vsp.counters["refused"] == 2 and w.inb.read() is None  # no answer
    assert w.mm.partitions["vm"].assigned_pages == 8192 and w.mm.discarded_pages == 0
    os.close(w.region.memfd)
