"""The VMBus controller: how the guest learns of channel offers and opens and closes channels.

Real VMBus does this with SynIC messages (INITIATE_CONTACT, REQUESTOFFERS, OFFERCHANNEL,
GPADL_HEADER, OPENCHANNEL ...). pyhv keeps the rings and packets byte-compatible but replaces
that set-up with a small register file on I/O ports (docs/vmbus.md): the guest reads offer
records, gives the GPA of a ring area it allocated (one contiguous range instead of a GPADL) and
the interrupt vector to use, and writes OPEN or CLOSE. The worker forwards port accesses to
`io_read` / `io_write`; every value the guest writes is checked before use.

`save()` gives the register file and the open channels as a versioned :class:`ControllerState`;
`restore(state)` opens the same channels over the same rings in another controller (live
migration), after checking every value against the offers and the guest memory it has.
"""

from __future__ import annotations

import ctypes
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from pyhv import wire
from pyhv.vmbus.channel import Channel, SavedChannel
from pyhv.vmbus.ring import PAGE_SIZE, RingCorrupt

log = logging.getLogger("pyhv.vmbus.controller")

DEFAULT_PORT = 0x0E00
CONTROLLER_ID = 0x43424D56  # "VMBC" in memory
CONTROLLER_VERSION = 1
MAX_RING_PAGES = 256  # 1 MiB per channel area: plenty for any VSP here
CONTROLLER_STATE_VERSION = 1


class Reg(IntEnum):
    """Register offsets from the base port; all registers are 32 bits wide."""

    ID = 0x00
    VERSION = 0x04
    OFFER_COUNT = 0x08
    SELECT = 0x0C
    OFFER_DATA = 0x10
    RING_GPA_LO = 0x14
    RING_GPA_HI = 0x18
    RING_PAGES = 0x1C
    DOWNSTREAM_PAGES = 0x20
    VECTOR = 0x24
    COMMAND = 0x28
    STATUS = 0x2C
    DOORBELL = 0x30


REGISTER_SPAN = 0x34


class Command(IntEnum):
    OPEN = 1
    CLOSE = 2


class Status(IntEnum):
    OK = 0
    BAD_OFFER = 1  # SELECT names no offer
    BAD_STATE = 2  # OPEN of an open channel, CLOSE of a closed one
    BAD_RING = 3  # size/split/vector wrong, or the ring's indices are not zeroed/valid
    BAD_GPA = 4  # the ring area is not guest RAM
    BAD_COMMAND = 5


class OfferRecord(ctypes.LittleEndianStructure):
    """What the guest reads through OFFER_DATA, 16 x u32."""

    _pack_ = 1
    _fields_ = [
        ("if_type", ctypes.c_uint8 * 16),  # GUID, Windows byte order (uuid.bytes_le)
        ("if_instance", ctypes.c_uint8 * 16),
        ("child_relid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),  # bit0: open
        ("ring_data_bytes", ctypes.c_uint32),  # suggested data bytes per direction
        ("doorbell_port", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32 * 4),
    ]


assert ctypes.sizeof(OfferRecord) == 64
assert OfferRecord.child_relid.offset == 32 and OfferRecord.doorbell_port.offset == 44


@dataclass(frozen=True)
class ControllerState:
    """The register file as the guest left it and the channels it has open."""

    version: int
    select: int
    cursor: int
    ring_gpa: int
    ring_pages: int
    downstream_pages: int
    vector: int
    status: int
    channels: tuple[SavedChannel, ...] = ()
    counters: dict[str, int] = field(default_factory=dict)

    _INTS = ("version", "select", "cursor", "ring_gpa", "ring_pages", "downstream_pages")

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> ControllerState:
        """The shape (types, declared by the fields); restore() checks the values."""
        return wire.from_wire(cls, d, "VMBus controller state")


@dataclass(eq=False)
class Offer:
    """A device the host offers; `on_open` gets the channel when the guest opens it."""

    if_type: uuid.UUID
    if_instance: uuid.UUID
    on_open: Callable[[Channel], object]
    ring_data_bytes: int = 16 * 1024
    relid: int = 0
    channel: Channel | None = None
    # where the guest put the rings at its last successful OPEN (what a GPADL tells Hyper-V)
    ring_gpa: int = 0
    ring_pages: int = 0
    downstream_pages: int = 0
    vector: int = 0


class VmbusController:
    """The register file. `guest_memory(gpa, size)` returns a writable view of guest RAM or
    raises ValueError; `interrupt_for(vector)` returns what signals the guest on that vector
    (a callable or an irqfd)."""

    def __init__(
        self,
        guest_memory: Callable[[int, int], memoryview],
        interrupt_for: Callable[[int], Callable[[], object] | int],
        base_port: int = DEFAULT_PORT,
    ) -> None:
        self._guest_memory = guest_memory
        self._interrupt_for = interrupt_for
        self.base_port = base_port
        self.offers: list[Offer] = []
        self._select = 0
        self._cursor = 0
        self._gpa = 0
        self._pages = 0
        self._downstream = 0
        self._vector = 0
        self.status = Status.OK
        self.counters: dict[str, int] = {"refused": 0, "opened": 0, "closed": 0, "doorbells": 0}

    def offer(
        self,
        if_type: uuid.UUID | str,
        on_open: Callable[[Channel], object],
        if_instance: uuid.UUID | None = None,
        ring_data_bytes: int = 16 * 1024,
    ) -> Offer:
        o = Offer(
            uuid.UUID(str(if_type)),
            if_instance or uuid.uuid4(),
            on_open,
            ring_data_bytes,
            relid=len(self.offers) + 1,
        )
        self.offers.append(o)
        return o

    def record(self, offer: Offer) -> OfferRecord:
        r = OfferRecord(
            child_relid=offer.relid,
            flags=int(offer.channel is not None),
            ring_data_bytes=offer.ring_data_bytes,
            doorbell_port=self.base_port + Reg.DOORBELL,
        )
        ctypes.memmove(r.if_type, offer.if_type.bytes_le, 16)
        ctypes.memmove(r.if_instance, offer.if_instance.bytes_le, 16)
        return r

    # -- port I/O ---------------------------------------------------------------------------------

    def io_read(self, offset: int) -> int:
        if offset == Reg.ID:
            return CONTROLLER_ID
        if offset == Reg.VERSION:
            return CONTROLLER_VERSION
        if offset == Reg.OFFER_COUNT:
            return len(self.offers)
        if offset == Reg.SELECT:
            return self._select
        if offset == Reg.OFFER_DATA:
            if self._select >= len(self.offers) or self._cursor >= 16:
                return 0
            raw = bytes(self.record(self.offers[self._select]))
            word = int.from_bytes(raw[self._cursor * 4 : self._cursor * 4 + 4], "little")
            self._cursor += 1
            return word
        if offset == Reg.STATUS:
            return int(self.status)
        return 0xFFFFFFFF  # like an unclaimed bus

    def io_write(self, offset: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if offset == Reg.SELECT:
            self._select, self._cursor = value, 0
        elif offset == Reg.RING_GPA_LO:
            self._gpa = (self._gpa & ~0xFFFFFFFF) | value
        elif offset == Reg.RING_GPA_HI:
            self._gpa = (self._gpa & 0xFFFFFFFF) | (value << 32)
        elif offset == Reg.RING_PAGES:
            self._pages = value
        elif offset == Reg.DOWNSTREAM_PAGES:
            self._downstream = value
        elif offset == Reg.VECTOR:
            self._vector = value
        elif offset == Reg.COMMAND:
            self.status = self._command(value)
            if self.status is not Status.OK:
                self.counters["refused"] += 1
                log.warning("vmbus controller: command %d refused: %s", value, self.status.name)
        elif offset == Reg.DOORBELL:
            self.doorbell(value)

    def doorbell(self, relid: int) -> None:
        """The guest signalled channel `relid` (also the ioeventfd path's handler)."""
        self.counters["doorbells"] += 1
        if 1 <= relid <= len(self.offers):
            ch = self.offers[relid - 1].channel
            if ch is not None:
                ch.doorbell()
                return
        self.counters["refused"] += 1

    def _command(self, cmd: int) -> Status:
        if self._select >= len(self.offers):
            return Status.BAD_OFFER
        offer = self.offers[self._select]
        if cmd == Command.CLOSE:
            if offer.channel is None:
                return Status.BAD_STATE
            offer.channel.close("closed by the guest")
            return Status.OK
        if cmd != Command.OPEN:
            return Status.BAD_COMMAND
        if offer.channel is not None:
            return Status.BAD_STATE
        want = SavedChannel(offer.relid, self._gpa, self._pages, self._downstream, self._vector)
        status = self._check_ring(want)
        if status is not Status.OK:
            return status
        try:
            ch = self._channel(want)
        except (RingCorrupt, ValueError):
            return Status.BAD_RING
        self._attach(offer, ch)
        return Status.OK

    def _check_ring(self, c: SavedChannel) -> Status:
        if (
            c.ring_gpa % PAGE_SIZE
            or not 4 <= c.ring_pages <= MAX_RING_PAGES
            or not 2 <= c.downstream_pages <= c.ring_pages - 2
            or not 32 <= c.vector <= 255
        ):
            return Status.BAD_RING
        try:
            self._guest_memory(c.ring_gpa, c.ring_pages * PAGE_SIZE)
        except ValueError:
            return Status.BAD_GPA
        return Status.OK

    def _channel(self, c: SavedChannel) -> Channel:
        area = self._guest_memory(c.ring_gpa, c.ring_pages * PAGE_SIZE)
        return Channel(
            area,
            c.downstream_pages,
            self._interrupt_for(c.vector),
            relid=c.relid,
            ring_gpa=c.ring_gpa,
            vector=c.vector,
        )

    def _attach(self, offer: Offer, ch: Channel) -> None:
        def closed(why: str, offer: Offer = offer) -> None:
            offer.channel = None
            self.counters["closed"] += 1

        ch.close_listeners.append(closed)
        offer.channel = ch
        # the channel's own (checked) ring, not the register file: on restore() the registers
        # are the peer's, range-checked only, and need not describe any channel
        c = ch.save()
        offer.ring_gpa, offer.ring_pages = c.ring_gpa, c.ring_pages
        offer.downstream_pages, offer.vector = c.downstream_pages, c.vector
        self.counters["opened"] += 1
        offer.on_open(ch)

    # -- save / restore (live migration) --------------------------------------------------------

    def save(self) -> ControllerState:
        """The registers and the open channels (the rings stay in guest memory)."""
        return ControllerState(
            CONTROLLER_STATE_VERSION,
            self._select,
            self._cursor,
            self._gpa,
            self._pages,
            self._downstream,
            self._vector,
            int(self.status),
            tuple(o.channel.save() for o in self.offers if o.channel is not None),
            dict(self.counters),
        )

    def check(self, st: ControllerState) -> None:
        """Whether `st` fits this controller and its guest memory; ValueError naming the value."""
        if st.version != CONTROLLER_STATE_VERSION:
            raise ValueError(
                f"VMBus controller state version {st.version!r} is not {CONTROLLER_STATE_VERSION}"
            )
        for name, value, top in (
            ("select", st.select, 0xFFFFFFFF),
            ("cursor", st.cursor, 16),
            ("ring GPA", st.ring_gpa, (1 << 64) - 1),
            ("ring pages", st.ring_pages, 0xFFFFFFFF),
            ("downstream pages", st.downstream_pages, 0xFFFFFFFF),
            ("vector", st.vector, 0xFFFFFFFF),
        ):
            if not 0 <= value <= top:
                raise ValueError(f"VMBus controller state: {name} {value} is out of 0..{top:#x}")
        if st.status not in Status._value2member_map_:
            raise ValueError(f"VMBus controller state: status {st.status} is no Status")
        bad = {k: v for k, v in st.counters.items() if v < 0}
        if bad:
            raise ValueError(f"VMBus controller state: counters {bad} are negative")
        seen: set[int] = set()
        for c in st.channels:
            if not 1 <= c.relid <= len(self.offers) or c.relid in seen:
                raise ValueError(
                    f"VMBus channel {c.relid}: no such offer here ({len(self.offers)} offers) "
                    "or listed twice"
                )
            seen.add(c.relid)
            if self.offers[c.relid - 1].channel is not None:
                raise ValueError(f"VMBus channel {c.relid} is open here already")
            status = self._check_ring(c)
            if status is Status.BAD_GPA:
                raise ValueError(
                    f"VMBus channel {c.relid}: its ring at GPA {c.ring_gpa:#x} "
                    f"(+{c.ring_pages} pages) is outside this guest's RAM"
                )
            if status is not Status.OK:
                raise ValueError(
                    f"VMBus channel {c.relid}: ring of {c.ring_pages} pages at {c.ring_gpa:#x} "
                    f"split at {c.downstream_pages}, vector {c.vector}: not a ring a guest can "
                    "open"
                )

    def restore(self, st: ControllerState) -> None:
        """Open `st`'s channels over the same rings (indices as the guest left them) and take
        its registers; checked first: if it does not fit, ValueError and nothing changed."""
        self.check(st)
        made: list[Channel] = []
        try:
            for c in st.channels:
                made.append(self._channel(c))
        except (RingCorrupt, ValueError) as e:
            for ch in made:
                ch.reader.release()
                ch.writer.release()
            raise ValueError(f"VMBus channel {st.channels[len(made)].relid}: {e}") from None
        self._select, self._cursor = st.select, st.cursor
        self._gpa, self._pages, self._downstream = st.ring_gpa, st.ring_pages, st.downstream_pages
        self._vector, self.status = st.vector, Status(st.status)
        for c, ch in zip(st.channels, made, strict=True):
            self._attach(self.offers[c.relid - 1], ch)
        self.counters.update(st.counters)

    def reset(self) -> None:
        """Guest reboot: every channel closes."""
        for o in self.offers:
            if o.channel is not None:
                o.channel.close("controller reset")
