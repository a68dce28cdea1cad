"""Fuzz targets of VMBus: the ring buffer reader with its packet descriptors (what the guest
writes into a ring, control page included), the host's writer over a ring whose indices the
guest set, and the controller's register file driven by port I/O, with a Dynamic Memory VSP on
the channel the guest opens (the guest's packets reach it through the ring)."""

from __future__ import annotations

import struct
import uuid

from pyhv.dynmem.vsp import DynamicMemoryVsp
from pyhv.memory.ranges import RangeSet
from pyhv.vmbus.channel import Channel
from pyhv.vmbus.controller import REGISTER_SPAN, Command, Reg, VmbusController
from pyhv.vmbus.packet import PacketType
from pyhv.vmbus.ring import PAGE_SIZE, RingControl, RingError, RingReader, RingWriter
from tests.support.fuzz import Reader, Target, blob
from tests.support.fuzz.dynmem import guest_messages
from tests.support.guest_ring import GuestRing

DATA_PAGES = 2
#: The input's head: the control page's write_index, read_index, interrupt_mask,
#: pending_send_sz and feature_bits; the data area follows.
CONTROL = struct.Struct("<IIIII")


def _ring(data: bytes) -> bytearray:
    """A ring area (control page + data pages) holding `data` as described above."""
    mem = bytearray((1 + DATA_PAGES) * PAGE_SIZE)
    head = data[: CONTROL.size].ljust(CONTROL.size, b"\0")
    w, r, mask, pending, feat = CONTROL.unpack(head)
    ctl = RingControl.from_buffer(mem)
    ctl.write_index, ctl.read_index, ctl.interrupt_mask = w, r, mask
    ctl.pending_send_sz, ctl.feature_bits = pending, feat
    del ctl
    body = data[CONTROL.size : CONTROL.size + DATA_PAGES * PAGE_SIZE]
    mem[PAGE_SIZE : PAGE_SIZE + len(body)] = body
    return mem


def read_ring(data: bytes) -> None:
    mem = _ring(data)
    reader = RingReader(memoryview(mem), lambda: None)
    try:
        for _ in range(64):
            packets = reader.read_packets(16)
            for pkt in packets:
                assert len(pkt.payload) < reader.size, "a payload larger than the ring"
            if not packets:
                break
    finally:
        reader.release()


def write_ring(data: bytes) -> None:
    """The host writes into a ring whose read index (and mask, pending size) the guest set."""
    mem = _ring(data)
    writer = RingWriter(memoryview(mem), lambda: None)
    try:
        for n in (0, 8, 100, 2000):
            if not writer.try_write(bytes(n)):
                break
    finally:
        writer.release()


def ring_seeds() -> list[bytes]:
    """Rings a correct guest leaves: packets written by the guest side of the ring, some of
    them across the end of the data area."""
    out = []
    msgs = list(guest_messages().values())
    for start in (0, 4096, DATA_PAGES * PAGE_SIZE - 64):
        mem = bytearray((1 + DATA_PAGES) * PAGE_SIZE)
        view = memoryview(mem)
        g = GuestRing(view, init=True)
        g.set(0, start)
        g.set(4, start)
        for i, m in enumerate(msgs[:4]):
            g.write(m, trans_id=i, ptype=int(PacketType.DATA_INBAND) if i else int(PacketType.COMP))
        ctl = CONTROL.pack(g.get(0), g.get(4), g.get(8), g.get(12), g.get(64))
        g.release()
        out.append(ctl + bytes(mem[PAGE_SIZE:]))
    return out


RING_READER = Target(
    "vmbus.ring_reader",
    "VMBus ring reader and packet descriptors (pyhv.vmbus.ring.RingReader)",
    ring_seeds,
    read_ring,
    (RingError,),
    max_size=CONTROL.size + DATA_PAGES * PAGE_SIZE,
    kind="simulation",
)
RING_WRITER = Target(
    "vmbus.ring_writer",
    "VMBus ring writer over guest-set indices (pyhv.vmbus.ring.RingWriter)",
    ring_seeds,
    write_ring,
    (RingError,),
    max_size=CONTROL.size + DATA_PAGES * PAGE_SIZE,
    kind="simulation",
)


# --- the controller, by port I/O ----------------------------------------------------------------

RAM = 64 * PAGE_SIZE
RING_GPA = 16 * PAGE_SIZE
DM = uuid.UUID("525074DC-8985-46e2-8057-A307DC18A502")
WRITE, READ, SEND, POKE, DOORBELL = range(5)


class _Guest:
    def __init__(self) -> None:
        self.ram = bytearray(RAM)
        self.view = memoryview(self.ram)
        self.ctl = VmbusController(self.memory, lambda v: lambda: None)
        self.vsps: list[DynamicMemoryVsp] = []
        self.channels: list[Channel] = []
        self.ctl.offer(DM, self.open)
        self.ctl.offer(DM, self.channels.append)  # a second offer nobody serves

    def memory(self, gpa: int, size: int) -> memoryview:
        if gpa < 0 or size < 0 or gpa + size > RAM:
            raise ValueError(f"{gpa:#x}+{size:#x} is not RAM")
        return self.view[gpa : gpa + size]

    def open(self, ch: Channel) -> None:
        vsp = DynamicMemoryVsp(RangeSet([(0, RAM // PAGE_SIZE)]))
        vsp.bind(ch)
        self.channels.append(ch)
        self.vsps.append(vsp)


def drive_controller(data: bytes) -> None:
    g = _Guest()
    r = Reader(data)
    steps = 0
    while r.left and steps < 128:
        steps += 1
        op = r.u8() % 5
        if op == WRITE:
            g.ctl.io_write(r.u8() % (REGISTER_SPAN + 4), r.u32())
        elif op == READ:
            value = g.ctl.io_read(r.u8() % (REGISTER_SPAN + 4))
            assert 0 <= value <= 0xFFFFFFFF
        elif op == SEND:
            # the guest side of the open ring writes a packet (a test helper: its own refusals
            # of a ring the program corrupted are not the host's)
            payload, ptype = r.blob(), r.u8()
            ch = g.channels[-1] if g.channels else None
            if ch is not None and ch.ring_gpa is not None:
                area = g.view[ch.ring_gpa : ch.ring_gpa + ch.downstream_pages * PAGE_SIZE]
                ring = GuestRing(area)
                try:
                    ring.write(payload, ptype=ptype)
                except (BlockingIOError, ValueError, IndexError, struct.error):
                    pass
                finally:
                    ring.release()
        elif op == POKE:
            at = r.u16() * 8 % RAM
            chunk = r.blob()
            g.ram[at : at + len(chunk)] = chunk[: RAM - at]
        elif op == DOORBELL:
            g.ctl.doorbell(r.u8())
    for vsp in g.vsps:
        for rng in vsp.ballooned:
            assert vsp.ram.contains(*rng)


def _w(reg: int, value: int) -> bytes:
    return bytes([WRITE, reg]) + struct.pack("<I", value)


def controller_seeds() -> list[bytes]:
    m = guest_messages()
    open_ = b"".join(
        _w(r, v)
        for r, v in [
            (Reg.SELECT, 0),
            (Reg.RING_GPA_LO, RING_GPA),
            (Reg.RING_GPA_HI, 0),
            (Reg.RING_PAGES, 8),
            (Reg.DOWNSTREAM_PAGES, 4),
            (Reg.VECTOR, 0x40),
            (Reg.COMMAND, Command.OPEN),
        ]
    )
    offers = _w(Reg.SELECT, 1) + bytes([READ, Reg.OFFER_DATA]) * 16 + bytes([READ, Reg.STATUS])
    send = b"".join(bytes([SEND]) + blob(m[k]) + bytes([6]) for k in ("version", "caps", "status"))
    ring = bytes([DOORBELL, 1])
    return [
        offers + open_ + bytes([READ, Reg.STATUS]) + send + ring,
        open_ + send + ring + _w(Reg.COMMAND, Command.CLOSE) + open_ + send + ring,
        open_ + bytes([POKE]) + struct.pack("<H", RING_GPA // 8) + blob(struct.pack("<II", 8, 0)),
    ]


CONTROLLER = Target(
    "vmbus.controller",
    "VMBus controller register file by port I/O, rings and DM VSP behind it (pyhv.vmbus)",
    controller_seeds,
    drive_controller,
    (),
    max_size=4096,
    kind="simulation",
)

TARGETS = [RING_READER, RING_WRITER, CONTROLLER]
