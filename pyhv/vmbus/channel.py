"""A VMBus channel: the two rings of one guest-memory area, and the signals both ways.

The area is laid out as Linux lays out its GPADL: [guest->host ring][host->guest ring], the
second starting `downstream_pages` pages in (OPENCHANNEL's downstream_ringbuffer_pageoffset).
The host reads the first and writes the second. The guest rings the doorbell (an ioeventfd, or
a port write the worker forwards) when it has written a packet or freed space the host waits
for; the host interrupts the guest through `interrupt` (a callable, or an irqfd to write to).

An open channel's state (:class:`SavedChannel`: relid, ring GPA and size, split, vector) is what
the controller carries across a live migration; the rings themselves are guest memory.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

from pyhv import wire
from pyhv.vmbus.packet import Packet, PacketType
from pyhv.vmbus.ring import PAGE_SIZE, RingCorrupt, RingReader, RingWriter

log = logging.getLogger("pyhv.vmbus.channel")


class ChannelState(Enum):
    OPEN = auto()
    CLOSED = auto()


@dataclass(frozen=True)
class SavedChannel:
    """An open channel as the guest opened it: enough to open it again over the same rings."""

    relid: int
    ring_gpa: int
    ring_pages: int
    downstream_pages: int
    vector: int

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> SavedChannel:
        """The shape (types, declared by the fields); restore() checks the values."""
        return wire.from_wire(cls, d, "VMBus channel state")


class Channel:
    """One open channel. `on_packet` receives each packet the guest sent; `on_writable` is
    called after every doorbell, so a sender blocked on a full ring can retry; each of
    `close_listeners` learns why the channel closed."""

    def __init__(
        self,
        area: memoryview,
        downstream_pages: int,
        interrupt: Callable[[], object] | int | None = None,
        *,
        relid: int = 0,
        ring_gpa: int | None = None,
        vector: int | None = None,
        on_packet: Callable[[Packet], object] | None = None,
        on_writable: Callable[[], object] | None = None,
        on_close: Callable[[str], object] | None = None,
    ) -> None:
        area = memoryview(area).cast("B")
        pages = len(area) // PAGE_SIZE
        if len(area) % PAGE_SIZE or not 2 <= downstream_pages <= pages - 2:
            raise ValueError(
                f"ring area of {len(area):#x} bytes split at page {downstream_pages}: each "
                "direction needs a control page and at least one data page"
            )
        self.relid = relid
        #: Where the guest put the ring area and which vector it asked for (for save()).
        self.ring_gpa, self.vector = ring_gpa, vector
        self.ring_pages, self.downstream_pages = pages, downstream_pages
        split = downstream_pages * PAGE_SIZE
        self.reader = RingReader(area[:split], interrupt)
        try:
            self.writer = RingWriter(area[split:], interrupt)
        except BaseException:
            self.reader.release()
            raise
        self.state = ChannelState.OPEN
        self.on_packet = on_packet
        self.on_writable = on_writable
        self.close_listeners: list[Callable[[str], object]] = [on_close] if on_close else []
        self.close_reason: str | None = None
        self.doorbells = 0
        self.doorbell_fd: int | None = None
        # Guards the rings against a close from another thread. Never held while calling out
        # (on_packet, on_writable, close listeners), so callers may hold their own locks.
        self._lock = threading.Lock()

    def save(self) -> SavedChannel:
        if self.ring_gpa is None or self.vector is None:
            raise ValueError(f"channel {self.relid} was made without its ring GPA and vector")
        return SavedChannel(
            self.relid, self.ring_gpa, self.ring_pages, self.downstream_pages, self.vector
        )

    def try_send(
        self,
        payload: bytes,
        trans_id: int = 0,
        *,
        ptype: int = PacketType.DATA_INBAND,
        flags: int = 0,
    ) -> bool:
        """Write one packet for the guest; False if the ring is full (retry on a doorbell)."""
        with self._lock:
            if self.state is not ChannelState.OPEN:
                return False
            try:
                return self.writer.try_write(payload, trans_id, ptype=ptype, flags=flags)
            except RingCorrupt as e:
                why = str(e)
        self.close(why)
        return False

    def poll(self, limit: int = 256) -> int:
        """Read and dispatch the packets the guest has written; returns how many."""
        corrupt: RingCorrupt | None = None
        packets: list[Packet] = []
        with self._lock:
            if self.state is not ChannelState.OPEN:
                return 0
            try:
                packets = self.reader.read_packets(limit)
            except RingCorrupt as e:
                corrupt = e
        if corrupt is not None:
            self.close(str(corrupt))
            return 0
        if self.on_packet is not None:
            for pkt in packets:
                self.on_packet(pkt)
        return len(packets)

    def doorbell(self) -> int:
        """The guest signalled: drain its ring, then let blocked senders retry."""
        self.doorbells += 1
        n = 0
        while self.state is ChannelState.OPEN:
            got = self.poll()
            n += got
            if got < 256:
                break
        if self.on_writable is not None and self.state is ChannelState.OPEN:
            self.on_writable()
        return n

    def on_doorbell_fd(self) -> int:
        """For an event loop watching `doorbell_fd` (the ioeventfd): consume it and serve."""
        if self.doorbell_fd is not None:
            try:
                os.read(self.doorbell_fd, 8)
            except BlockingIOError:
                pass
        return self.doorbell()

    def frozen(self) -> threading.Lock:
        """Hold it (`with channel.frozen():`) and neither side's ring changes through this
        channel: a live migration copies the rings while it is held."""
        return self._lock

    def close(self, why: str = "closed by the host") -> None:
        with self._lock:
            if self.state is ChannelState.CLOSED:
                return
            self.state = ChannelState.CLOSED
            self.close_reason = why
            self.reader.release()
            self.writer.release()
        log.info("channel %d closed: %s", self.relid, why)
        for listener in list(self.close_listeners):
            listener(why)
