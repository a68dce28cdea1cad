"""The VMBus controller: offers, open and close, as the guest drives them by port I/O."""

from __future__ import annotations

import mmap
import uuid

import pytest

from pyhv.vmbus.channel import Channel, ChannelState
from pyhv.vmbus.controller import (
    CONTROLLER_ID,
    Command,
    OfferRecord,
    Reg,
    Status,
    VmbusController,
)
from pyhv.vmbus.ring import PAGE_SIZE
from tests.support.guest_ring import READ, GuestRing

pytestmark = pytest.mark.simulation

RAM = 1 << 20
DM = uuid.UUID("525074DC-8985-46e2-8057-A307DC18A502")


class Guest:
    """Guest RAM and a guest driver of the controller's registers."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, RAM)
        self.ram = memoryview(self.mm)
        self.interrupts: list[int] = []
        self.opened: list[Channel] = []
        self.ctl = VmbusController(self.view, lambda v: lambda: self.interrupts.append(v))
        self.ctl.offer(DM, self.opened.append)

    def view(self, gpa: int, size: int) -> memoryview:
        if gpa < 0 or gpa + size > RAM:
            raise ValueError(f"{gpa:#x}+{size:#x} is not RAM")
        return self.ram[gpa : gpa + size]

    def read_offer(self, i: int) -> OfferRecord:
        self.ctl.io_write(Reg.SELECT, i)
        words = b"".join(self.ctl.io_read(Reg.OFFER_DATA).to_bytes(4, "little") for _ in range(16))
        return OfferRecord.from_buffer_copy(words)

    def open(self, gpa: int = 0x10000, pages: int = 8, split: int = 4, vector: int = 0x40) -> int:
        for r, v in [
            (Reg.RING_GPA_LO, gpa & 0xFFFFFFFF),
            (Reg.RING_GPA_HI, gpa >> 32),
            (Reg.RING_PAGES, pages),
            (Reg.DOWNSTREAM_PAGES, split),
            (Reg.VECTOR, vector),
            (Reg.COMMAND, Command.OPEN),
        ]:
            self.ctl.io_write(r, v)
        return self.ctl.io_read(Reg.STATUS)


def test_the_guest_reads_the_offer_of_the_dynamic_memory_device() -> None:
    g = Guest()
    assert g.ctl.io_read(Reg.ID) == CONTROLLER_ID
    assert g.ctl.io_read(Reg.OFFER_COUNT) == 1
    rec = g.read_offer(0)
    assert uuid.UUID(bytes_le=bytes(rec.if_type)) == DM
    assert bytes(rec.if_type)[:4] == bytes.fromhex("dc745052")  # Windows GUID byte order
    assert rec.child_relid == 1 and rec.flags == 0 and rec.ring_data_bytes == 16384
    assert rec.doorbell_port == 0x0E00 + Reg.DOORBELL


def test_opening_a_channel_hands_it_to_the_vsp_and_packets_flow_both_ways() -> None:
    g = Guest()
    g.ctl.io_write(Reg.SELECT, 0)
    assert g.open() == Status.OK
    (ch,) = g.opened
    got: list[int] = []
    ch.on_packet = lambda p: got.append(p.trans_id)
    out = GuestRing(g.ram[0x10000 : 0x10000 + 4 * PAGE_SIZE])
    inb = GuestRing(g.ram[0x14000:0x18000])
    out.write(b"ping", 3)
    g.ctl.io_write(Reg.DOORBELL, 1)
    assert got == [3]
    assert ch.try_send(b"pong", 4) and g.interrupts == [0x40]
    assert inb.read() == (6, 0, 4, b"pong\0\0\0\0")
    assert g.read_offer(0).flags == 1


def test_open_is_refused_for_bad_rings_and_addresses() -> None:
    g = Guest()
    g.ctl.io_write(Reg.SELECT, 0)
    assert g.open(gpa=0x10001) == Status.BAD_RING
    assert g.open(pages=8, split=7) == Status.BAD_RING
    assert g.open(vector=3) == Status.BAD_RING
    assert g.open(gpa=RAM - PAGE_SIZE) == Status.BAD_GPA
    struct_bad = g.ram[0x10000 + 4 : 0x10000 + 8]
    struct_bad[:] = (5).to_bytes(4, "little")  # a read index that is not 8-aligned
    assert g.open() == Status.BAD_RING
    g.ram[0x10000:0x10008] = bytes(8)
    g.ctl.io_write(Reg.SELECT, 7)
    assert g.open() == Status.BAD_OFFER
    assert g.ctl.counters["refused"] == 6 and g.opened == []


def test_close_by_the_guest_closes_the_channel_and_the_offer_can_be_reopened() -> None:
    g = Guest()
    g.ctl.io_write(Reg.SELECT, 0)
    g.open()
    assert g.open() == Status.BAD_STATE
    g.ctl.io_write(Reg.COMMAND, Command.CLOSE)
    assert g.ctl.io_read(Reg.STATUS) == Status.OK
    assert g.opened[0].state is ChannelState.CLOSED
    GuestRing(g.ram[0x10000:0x14000]).set(READ, 0)
    assert g.open() == Status.OK and len(g.opened) == 2


def test_a_doorbell_for_no_open_channel_is_counted_and_ignored() -> None:
    g = Guest()
    g.ctl.io_write(Reg.DOORBELL, 1)
    g.ctl.io_write(Reg.DOORBELL, 99)
    assert g.ctl.counters["refused"] == 2
