"""One direction of a VMBus ring buffer in guest memory, seen from the host.

Layout (reference/vmbus.md 3.1): one 4 KiB control page (`struct hv_ring_buffer`) followed by the
data pages. The host is the producer of the host->guest ring (`RingWriter`) and the consumer of
the guest->host ring (`RingReader`). Everything the guest can write is untrusted: indices are read
once, checked, and the host keeps its own copy of the index it owns.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable

from pyhv.vmbus.packet import (
    DESCRIPTOR,
    INBAND_OFFSET8,
    KNOWN_TYPES,
    TRAILER,
    Packet,
    PacketType,
    aligned_packet_len,
)

PAGE_SIZE = 4096
FEAT_PENDING_SEND_SZ = 1


class RingControl(ctypes.LittleEndianStructure):
    """`struct hv_ring_buffer`, the control page of one ring direction."""

    _pack_ = 1
    _fields_ = [
        ("write_index", ctypes.c_uint32),
        ("read_index", ctypes.c_uint32),
        ("interrupt_mask", ctypes.c_uint32),
        ("pending_send_sz", ctypes.c_uint32),
        ("reserved1", ctypes.c_uint32 * 12),
        ("feature_bits", ctypes.c_uint32),
        ("reserved2", ctypes.c_uint8 * (PAGE_SIZE - 68)),
    ]


assert ctypes.sizeof(RingControl) == PAGE_SIZE
assert RingControl.write_index.offset == 0
assert RingControl.read_index.offset == 4
assert RingControl.interrupt_mask.offset == 8
assert RingControl.pending_send_sz.offset == 12
assert RingControl.reserved1.offset == 16
assert RingControl.feature_bits.offset == 64
assert RingControl.reserved2.offset == 68


class RingError(Exception):
    """Base of the errors of this module."""


class RingCorrupt(RingError):
    """The guest put a value in the ring that no correct producer/consumer writes.

    The ring cannot be trusted any more (packet boundaries are lost): the channel must be closed.
    """

    def __init__(self, field: str, value: int, why: str) -> None:
        self.field = field
        self.value = value
        super().__init__(f"ring corrupt: {field}={value:#x}: {why}; close the channel")


# A full memory barrier. CPython offers none directly; acquiring and releasing a lock executes a
# locked instruction (a full fence on x86), which orders our stores to the ring before the index
# store, and the index store before the loads that decide whether to signal.
_fence_lock = threading.Lock()


def _barrier() -> None:
    _fence_lock.acquire()
    _fence_lock.release()


_ZEROS = bytes(8)


def _notifier(target: Callable[[], object] | int | None) -> Callable[[], object]:
    """A signal target: a callable, an eventfd to write 1 to (e.g. an irqfd), or None."""
    if target is None:
        return lambda: None
    if isinstance(target, int):
        fd = target
        one = (1).to_bytes(8, "little")
        return lambda: os.write(fd, one)
    return target


class _Ring:
    def __init__(self, mem: memoryview, signal: Callable[[], object] | int | None) -> None:
        mem = memoryview(mem).cast("B")
        if mem.readonly:
            raise ValueError("ring memory must be writable")
        if len(mem) < 2 * PAGE_SIZE or len(mem) % PAGE_SIZE:
            raise ValueError(
                f"ring of {len(mem)} bytes: need a control page plus at least one data page, "
                f"a multiple of {PAGE_SIZE} bytes"
            )
        self._mem = mem
        self._ctl = RingControl.from_buffer(mem)
        self._data = mem[PAGE_SIZE:]
        #: Bytes of the data area (`ring_datasize`).
        self.size = len(self._data)
        self._signal = _notifier(signal)
        self.signals = 0
        #: Bad index values seen in the control page.
        self.bad_indices = 0

    def release(self) -> None:
        """Drop the references into guest memory (so the mapping can be unmapped)."""
        del self._ctl
        self._data.release()
        self._mem.release()

    def _check_index(self, name: str, value: int) -> int:
        if value >= self.size or value & 7:
            self.bad_indices += 1
        if value >= self.size:
            raise RingCorrupt(name, value, f"beyond the data area of {self.size:#x} bytes")
        if value & 7:
            raise RingCorrupt(name, value, "not 8-byte aligned")
        return value

    def _to_read(self, write: int, read: int) -> int:
        return write - read if write >= read else self.size - (read - write)

    def _notify(self) -> None:
        self.signals += 1
        self._signal()


class RingReader(_Ring):
    """The host as consumer: reads the packets the guest produced.

    `signal` tells the guest (producer) that space it waited for is free (pending_send_sz rule).
    """

    def __init__(self, mem: memoryview, signal: Callable[[], object] | int | None = None) -> None:
        super().__init__(mem, signal)
        self._read = self._check_index("read_index", self._ctl.read_index)
        self._check_index("write_index", self._ctl.write_index)
        self.packets = 0
        self.bad_packets = 0

    @property
    def read_index(self) -> int:
        return self._read

    def available(self) -> int:
        """Bytes the guest has published and the host not yet read (write index checked)."""
        return self._to_read(self._check_index("write_index", self._ctl.write_index), self._read)

    def _get(self, off: int, n: int) -> bytes:
        end = off + n
        if end <= self.size:
            return bytes(self._data[off:end])
        return bytes(self._data[off:]) + bytes(self._data[: end - self.size])

    def _next(self, read: int, avail: int) -> tuple[Packet | None, int]:
        """Decode the packet at `read` among `avail` published bytes; returns it (None if of an
        unknown type, skipped and counted) and its length including the trailer."""
        if avail < DESCRIPTOR.size + TRAILER.size:
            self.bad_packets += 1
            raise RingCorrupt("available bytes", avail, "less than a descriptor and a trailer")
        ptype, off8, len8, flags, trans_id = DESCRIPTOR.unpack(self._get(read, DESCRIPTOR.size))
        total = len8 * 8 + TRAILER.size
        if len8 < INBAND_OFFSET8 or total > avail:
            self.bad_packets += 1
            raise RingCorrupt("len8", len8, f"packet of {len8 * 8} bytes with {avail} published")
        if off8 < INBAND_OFFSET8 or off8 > len8:
            self.bad_packets += 1
            raise RingCorrupt("offset8", off8, f"payload offset outside the packet (len8={len8})")
        if ptype not in KNOWN_TYPES:
            # The framing is intact, so the ring survives: skip this packet.
            self.bad_packets += 1
            return None, total
        start = read + off8 * 8
        if start >= self.size:
            start -= self.size
        payload = self._get(start, (len8 - off8) * 8)
        return Packet(ptype, flags, trans_id, payload), total

    def read_packets(self, limit: int = 1 << 30) -> list[Packet]:
        """Read up to `limit` packets, then publish the new read index once.

        Raises RingCorrupt if the guest broke the ring; packets of unknown type are skipped and
        counted in `bad_packets`.
        """
        write = self._check_index("write_index", self._ctl.write_index)
        read = self._read
        avail = self._to_read(write, read)
        out: list[Packet] = []
        consumed = 0
        while avail and len(out) < limit:
            pkt, total = self._next(read, avail)
            read += total
            if read >= self.size:
                read -= self.size
            avail -= total
            consumed += total
            if pkt is not None:
                out.append(pkt)
        if consumed:
            self._commit(read, consumed)
            self.packets += len(out)
        return out

    def read_packet(self) -> Packet | None:
        """The next packet, or None if the ring is empty."""
        pkts = self.read_packets(1)
        return pkts[0] if pkts else None

    def _commit(self, read: int, consumed: int) -> None:
        _barrier()  # all copies out of the ring are done before the space is given back
        self._read = read
        self._ctl.read_index = read
        _barrier()  # the index store is visible before we look at pending_send_sz
        ctl = self._ctl
        if not (ctl.feature_bits & FEAT_PENDING_SEND_SZ):
            return
        pending = ctl.pending_send_sz
        if not pending:
            return
        # hv_pkt_iter_close: signal only on the transition "not enough" -> "enough".
        write = ctl.write_index
        if write >= self.size or write & 7:
            return  # a bad index is reported on the next read; a wakeup here is harmless to skip
        curr_write_sz = self.size - self._to_read(write, read)
        if curr_write_sz - consumed > pending:
            return
        if curr_write_sz <= pending:
            return
        self._notify()


class RingWriter(_Ring):
    """The host as producer: writes packets for the guest to consume.

    `signal` interrupts the guest; it is raised only when the ring goes from empty to non-empty
    and the guest has not masked interrupts.
    """

    def __init__(self, mem: memoryview, signal: Callable[[], object] | int | None = None) -> None:
        super().__init__(mem, signal)
        self._write = self._check_index("write_index", self._ctl.write_index)
        self._check_index("read_index", self._ctl.read_index)
        self.packets = 0
        self.full = 0
        self._pending = False

    @property
    def write_index(self) -> int:
        return self._write

    def max_payload(self) -> int:
        """The largest payload that can ever fit (the ring is never completely full)."""
        return self.size - TRAILER.size - DESCRIPTOR.size - 8

    def _put(self, off: int, src: bytes | bytearray | memoryview) -> int:
        n = len(src)
        end = off + n
        if end <= self.size:
            self._data[off:end] = src
            return end if end < self.size else 0
        k = self.size - off
        view = memoryview(src)
        self._data[off:] = view[:k]
        self._data[: n - k] = view[k:]
        return n - k

    def _free(self) -> int:
        read = self._check_index("read_index", self._ctl.read_index)
        return self.size - self._to_read(self._write, read)

    def try_write(
        self,
        payload: bytes | bytearray | memoryview,
        trans_id: int = 0,
        *,
        ptype: int = PacketType.DATA_INBAND,
        flags: int = 0,
    ) -> bool:
        """Write one packet (descriptor, payload, zero pad, trailer). Returns False when the ring
        has no room; then pending_send_sz tells the guest how much room to signal us about."""
        plen = aligned_packet_len(len(payload))
        total = plen + TRAILER.size
        if total >= self.size:
            raise ValueError(
                f"payload of {len(payload)} bytes never fits a ring of {self.size} data bytes; "
                f"at most {self.max_payload()}"
            )
        # "If there is only room for the packet, assume it is full": never fill completely.
        if self._free() <= total:
            self._ctl.pending_send_sz = total
            self._pending = True
            _barrier()
            if self._free() <= total:  # re-check: the guest may have read before seeing pending
                self.full += 1
                return False
        old = self._write
        w = self._put(old, DESCRIPTOR.pack(ptype, INBAND_OFFSET8, plen >> 3, flags, trans_id))
        w = self._put(w, payload)
        pad = plen - DESCRIPTOR.size - len(payload)
        if pad:
            w = self._put(w, _ZEROS[:pad])
        w = self._put(w, TRAILER.pack(old << 32))
        _barrier()  # data and trailer before the index
        self._write = w
        self._ctl.write_index = w
        if self._pending:
            self._ctl.pending_send_sz = 0
            self._pending = False
        _barrier()  # the index store before reading the guest's mask and read index
        self.packets += 1
        if self._ctl.interrupt_mask == 0 and old == self._ctl.read_index:
            self._notify()
        return True
