"""The worker's Dynamic Memory across a live migration, component by component, without the
stream: the source's memory layout (balloon, hot-added region) and channel + VSP state go into a
destination VM built from the same configuration, whose guest then goes on without negotiating
again; a state that does not fit the destination (a ring outside its RAM, a balloon the memory
manager does not hold) is refused and nothing there changes. Real KVM partitions; no guest code
runs: the test plays the guest's DM driver over rings in the partition's RAM."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import DmState
from pyhv.hypervisor import Partition
from pyhv.memory.manager import MemoryState
from pyhv.memory.ranges import PageRange
from pyhv.migration.memory import data_extents
from pyhv.vmbus.controller import Command, Reg
from pyhv.worker import boot
from pyhv.worker.config import VmConfig
from pyhv.worker.dynmem import DynamicMemoryService, DynamicMemoryState
from tests.support.guest_ring import GuestRing

pytestmark = pytest.mark.kvm

MiB = 1 << 20
PAGE = 4096
RING_GPA = 0x100000
RING_PAGES = 8


class Vm:
    """A partition with its RAM and the DM service, not started (no threads): the test rings
    the doorbell by calling the controller, as the doorbell thread would."""

    def __init__(self, **cfg: Any) -> None:
        self.config = VmConfig.create(image="none", check_image=False, dynamic_memory=True, **cfg)
        self.partition = Partition("dm-state")
        for base, size in boot.ram_regions(self.config.memory):
            self.partition.add_memory(base, size)
        self.svc = DynamicMemoryService(
            self.partition, self.config, interrupt_for=lambda v: lambda: None
        )
        # The guest's view of its rings (a migrated guest's: the indices its RAM holds).
        area = self.partition.view(RING_GPA, RING_PAGES * PAGE)
        self.out = GuestRing(area[: RING_PAGES // 2 * PAGE], init=False)
        self.inb = GuestRing(area[RING_PAGES // 2 * PAGE :], init=False)

    def open(self) -> None:
        area = self.partition.view(RING_GPA, RING_PAGES * PAGE)
        self.out = GuestRing(area[: RING_PAGES // 2 * PAGE], init=True)
        self.inb = GuestRing(area[RING_PAGES // 2 * PAGE :], init=True)
        for reg, v in [(Reg.SELECT, 0), (Reg.RING_GPA_LO, RING_GPA), (Reg.RING_GPA_HI, 0),
                       (Reg.RING_PAGES, RING_PAGES), (Reg.DOWNSTREAM_PAGES, RING_PAGES // 2),
                       (Reg.VECTOR, 0x50), (Reg.COMMAND, Command.OPEN)]:  # fmt: skip
            self.svc.controller.io_write(reg, v)

    def send(self, mtype: T, body: Any, **kw: Any) -> None:
        self.out.write(p.encode(mtype, body, **kw))
        self.svc.controller.doorbell(1)

    def receive(self) -> p.Message:
        pkt = self.inb.read()
        assert pkt is not None, "the host sent nothing"
        return p.decode(pkt[3])

    def close(self) -> None:
        self.svc.controller.reset()
        self.partition.close()


@pytest.fixture
def vms() -> Iterator[list[Vm]]:
    made: list[Vm] = []
    yield made
    for vm in made:
        vm.close()


def _vm(vms: list[Vm]) -> Vm:
    vm = Vm(memory="64M", minimum="32M", maximum="256M")
    vms.append(vm)
    return vm


def _source(vms: list[Vm]) -> Vm:
    """Negotiated, 1024 pages ballooned and 2 MiB hot-added, all through the goal."""
    a = _vm(vms)
    a.open()
    a.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=1)
    a.send(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1, hot_add=1, hot_add_alignment=1))
    version, caps = a.receive(), a.receive()
    assert (version.type, caps.type) == (T.VERSION_RESPONSE, T.CAPABILITIES_RESPONSE)
    assert caps.body.free_page_hints == 1  # pyhv's extension, offered
    a.svc.set_target(64 * MiB + 2 * MiB)
    req = a.receive()
    assert req.type is T.MEM_HOT_ADD_REQUEST
    a.send(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=req.body.range.page_cnt, result=1))
    a.svc.set_target(64 * MiB + 2 * MiB - 1024 * PAGE)
    assert a.receive().type is T.BALLOON_REQUEST
    a.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x2000, 1024)])
    assert a.svc.vsp.state is DmState.IDLE and a.svc.last_error is None
    return a


def _copy_rings(src: Vm, dst: Vm) -> None:
    """What the memory passes do for the ring area."""
    dst.partition.write(RING_GPA, src.partition.read(RING_GPA, RING_PAGES * PAGE))


def test_the_dm_channel_and_vsp_go_on_in_a_vm_built_from_the_same_configuration(
    vms: list[Vm],
) -> None:
    a = _source(vms)
    layout = MemoryState.from_wire(a.svc.save_memory().to_wire())
    state = DynamicMemoryState.from_wire(a.svc.save().to_wire())
    b = _vm(vms)
    b.svc.restore_memory(layout)
    assert b.svc.status()["hot_added_pages"] == 512 and b.svc.status()["ballooned_pages"] == 1024
    _copy_rings(a, b)
    b.svc.restore(state)
    assert b.svc.vsp.state is DmState.IDLE and b.svc.negotiated
    b.send(T.STATUS_REPORT, p.DmStatus(num_committed=4096, num_avail=1000))
    assert b.svc.last_status is not None and b.svc.last_status.committed_pages == 4096 - 1024
    b.svc.set_target(64 * MiB + 2 * MiB)  # the destination can unballoon what the source held
    req = b.receive()
    assert req.type is T.UNBALLOON_REQUEST and req.ranges == (PageRange(0x2000, 1024),)
    assert req.trans_id == state.vsp.trans_id + 1


def test_a_ring_outside_the_destinations_ram_is_refused_and_nothing_changes(
    vms: list[Vm],
) -> None:
    a = _source(vms)
    state = a.svc.save()
    chan = replace(state.channel.channels[0], ring_gpa=1 << 36)
    bad = replace(state, channel=replace(state.channel, channels=(chan,)))
    b = _vm(vms)
    b.svc.restore_memory(a.svc.save_memory())
    before = (b.svc.controller.save(), b.svc.vsp.save(), b.svc.save_memory())
    with pytest.raises(ValueError, match="outside this guest's RAM"):
        b.svc.restore(bad)
    assert (b.svc.controller.save(), b.svc.vsp.save(), b.svc.save_memory()) == before
    assert b.svc.offer.channel is None and b.svc.vsp.state is DmState.VERSION


def test_a_vsp_balloon_the_memory_manager_does_not_hold_is_refused(vms: list[Vm]) -> None:
    a = _source(vms)
    state = a.svc.save()
    b = _vm(vms)  # its layout not restored: no hot-added region, no balloon
    with pytest.raises(ValueError, match="not the memory manager's"):
        b.svc.restore(state)
    assert b.svc.offer.channel is None and b.svc.vsp.state is DmState.VERSION


def test_books_that_disagree_are_found_counted_and_settled_with_the_guest_owning_the_pages(
    vms: list[Vm], caplog: pytest.LogCaptureFixture
) -> None:
    a = _source(vms)
    assert a.svc.reconcile("now") and a.svc.counters["balloon_disagreements"] == 0
    mm, vsp = a.svc.mm, a.svc.vsp
    part = mm.partitions[a.svc.name]
    # a host bug in both directions: pages only the memory manager holds, pages only the VSP lists
    mm.release(a.svc.name, [PageRange(0x3000, 256)])
    vsp.ballooned.add(0x4000, 128)
    free = mm.free_pages
    assert not a.svc.reconcile("in a test")
    assert a.svc.counters["balloon_disagreements"] == 1
    assert any("disagree" in r.getMessage() for r in caplog.records)
    assert list(vsp.ballooned) == list(part.ballooned) == [PageRange(0x2000, 1024)]
    assert mm.free_pages == free - 256  # the host backs the pages it had released again
    assert a.svc.reconcile("again") and a.svc.counters["balloon_disagreements"] == 1


def test_free_page_hints_are_checked_range_by_range_and_the_good_ones_leave_the_host(
    vms: list[Vm], caplog: pytest.LogCaptureFixture
) -> None:
    import os

    a = _source(vms)  # pages 0x2000+1024 ballooned, 2 MiB hot-added above 64 MiB
    ram = a.partition.regions[0]
    # the guest has written 8 MiB from 16 MiB on: two blocks to hint, two to keep
    data = bytes(range(256)) * (8 * MiB // 256)
    a.partition.write(16 * MiB, data)
    blocks = os.fstat(ram.memfd).st_blocks * 512
    good = PageRange(16 * MiB // PAGE, 1024)
    hostile = [
        PageRange(1 << 30, 512),  # outside RAM
        PageRange(20 * MiB // PAGE + 1, 512),  # not whole blocks
        PageRange(0x2000, 512),  # ballooned
        PageRange(16 * MiB // PAGE + 512, 512),  # named twice (inside `good`)
        PageRange(40 * MiB // PAGE, 0),  # no pages
    ]
    a.send(T.FREE_PAGE_HINT, p.DmFreePageHint(), ranges=[good, *hostile], trans_id=77)
    resp = a.receive()
    assert resp.type is T.FREE_PAGE_HINT_RESPONSE and resp.trans_id == 77
    assert resp.body.discarded_pages == 1024 and resp.body.refused_ranges == len(hostile)
    vsp = a.svc.vsp
    assert vsp.counters["hint_refused_ranges"] == len(hostile)
    assert a.svc.counters["hinted_pages"] == 1024
    assert sum("free-page hint" in r.getMessage() for r in caplog.records) == len(hostile)
    # the memory behind the good range left the host; the guest reads zeros there, and the
    # pages it did not name keep their contents
    assert blocks - os.fstat(ram.memfd).st_blocks * 512 >= 4 * MiB
    # live migration's first pass sends only extents that hold data: the hinted pages are holes
    assert ram.gpa == 0
    extents = list(data_extents(ram))
    assert not any(a_ < good.end and good.start < b_ for a_, b_ in extents)
    assert any(a_ <= 20 * MiB // PAGE < b_ for a_, b_ in extents)
    assert a.partition.read(16 * MiB, 4 * MiB) == bytes(4 * MiB)
    assert a.partition.read(20 * MiB, 4 * MiB) == data[4 * MiB :]
    # nothing moved in the accounting: the pages are still the guest's
    st = a.svc.status()
    assert st["assigned_pages"] == st["visible_pages"] - 1024 and st["ballooned_pages"] == 1024
    assert vsp.state is DmState.IDLE


def test_a_free_page_hint_naming_the_hosts_vmbus_ring_is_refused_and_the_ring_kept(
    vms: list[Vm], caplog: pytest.LogCaptureFixture
) -> None:
    a = _source(vms)
    ring_block = PageRange(RING_GPA // PAGE // 512 * 512, 512)  # the 2 MiB block holding it
    beside = RING_GPA + RING_PAGES * PAGE  # a page of the same block the guest wrote
    a.partition.write(beside, b"kept" * (PAGE // 4))
    a.send(T.FREE_PAGE_HINT, p.DmFreePageHint(), ranges=[ring_block], trans_id=78)
    resp = a.receive()  # answered on that very ring: it is still there
    assert resp.type is T.FREE_PAGE_HINT_RESPONSE and resp.trans_id == 78
    assert resp.body.discarded_pages == 0 and resp.body.refused_ranges == 1
    assert a.svc.vsp.counters["hint_refused_ranges"] == 1
    assert a.svc.counters["hinted_pages"] == 0
    assert any("a VMBus ring" in r.getMessage() for r in caplog.records)
    # the block was refused whole: the guest's pages beside the ring were not discarded either
    assert a.partition.read(beside, PAGE) == b"kept" * (PAGE // 4)
