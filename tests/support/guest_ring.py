"""A test-only guest side of a VMBus ring, written from reference/vmbus.md 3.1/3.2 with plain
struct offsets (independent of pyhv.vmbus.ring), as the Linux VMBus driver behaves."""

from __future__ import annotations

import struct
from typing import Any

PAGE = 4096
_DESC = struct.Struct("<HHHHQ")
WRITE, READ, MASK, PENDING, FEAT = 0, 4, 8, 12, 64


class GuestRing:
    """One ring direction over `mem` (control page + data)."""

    def __init__(self, mem: memoryview, init: bool = False) -> None:
        self.mem = mem
        # Indices are read and written as single aligned 4-byte accesses (memoryview 'I'), as
        # the other side does: struct.pack_into stores byte by byte, and the other process
        # could read a torn index.
        self.ctl = mem[:PAGE].cast("I")
        self.dsize = len(mem) - PAGE
        if init:
            mem[:PAGE] = bytes(PAGE)
            self.set(FEAT, 1)  # Linux sets feat_pending_send_sz at init

    def release(self) -> None:
        self.ctl.release()
        self.mem.release()

    def get(self, off: int) -> int:
        return int(self.ctl[off // 4])

    def set(self, off: int, v: int) -> None:
        self.ctl[off // 4] = v

    def _copy_in(self, off: int, data: bytes) -> int:
        n = len(data)
        first = min(n, self.dsize - off)
        self.mem[PAGE + off : PAGE + off + first] = data[:first]
        if first < n:
            self.mem[PAGE : PAGE + n - first] = data[first:]
        return (off + n) % self.dsize

    def _copy_out(self, off: int, n: int) -> bytes:
        out = bytearray()
        for i in range(n):
            out.append(self.mem[PAGE + (off + i) % self.dsize])
        return bytes(out)

    def avail_to_write(self) -> int:
        w, r = self.get(WRITE), self.get(READ)
        return self.dsize - (w - r) if w >= r else r - w

    # guest as producer (guest->host ring)
    def write(self, payload: bytes, trans_id: int = 0, ptype: int = 6, flags: int = 0) -> bool:
        """vmbus_sendpacket + hv_ringbuffer_write. Returns whether the host should be signalled,
        or raises BlockingIOError when full."""
        packetlen = 16 + len(payload)
        aligned = (packetlen + 7) & ~7
        total = aligned + 8
        if self.avail_to_write() <= total:
            raise BlockingIOError("ring full")
        old = self.get(WRITE)
        pkt = _DESC.pack(ptype, 2, aligned >> 3, flags, trans_id) + payload
        pkt += bytes(aligned - len(pkt)) + struct.pack("<Q", old << 32)
        self.set(WRITE, self._copy_in(old, pkt))
        return self.get(MASK) == 0 and old == self.get(READ)

    # guest as consumer (host->guest ring)
    def read(self) -> tuple[int, int, int, bytes] | None:
        """One packet (type, flags, trans_id, payload) and advance read_index."""
        w, r = self.get(WRITE), self.get(READ)
        if w == r:
            return None
        ptype, off8, len8, flags, tid = _DESC.unpack(self._copy_out(r, 16))
        payload = self._copy_out((r + off8 * 8) % self.dsize, (len8 - off8) * 8)
        trailer = struct.unpack("<Q", self._copy_out((r + len8 * 8) % self.dsize, 8))[0]
        assert trailer == r << 32, "trailer must carry the packet's start offset << 32"
        self.set(READ, (r + len8 * 8 + 8) % self.dsize)
        return ptype, flags, tid, payload


def open_channel(
    ctl: Any, ram: memoryview, offer: int, ring_gpa: int, pages: int = 4
) -> tuple[GuestRing, GuestRing]:
    """What a guest does to open offer `offer` of a VmbusController `ctl`: zero both rings
    (`pages` pages each, from `ring_gpa` in `ram`), give their place and vector, OPEN; returns
    (guest->host, host->guest)."""
    from pyhv.vmbus.controller import Command, Reg

    size = pages * PAGE
    ram[ring_gpa : ring_gpa + 2 * size] = bytes(2 * size)
    out = GuestRing(ram[ring_gpa : ring_gpa + size], init=True)
    inb = GuestRing(ram[ring_gpa + size : ring_gpa + 2 * size], init=True)
    for r, v in [(Reg.SELECT, offer), (Reg.RING_GPA_LO, ring_gpa), (Reg.RING_GPA_HI, 0),
                 (Reg.RING_PAGES, 2 * pages), (Reg.DOWNSTREAM_PAGES, pages), (Reg.VECTOR, 0x40),
                 (Reg.COMMAND, Command.OPEN)]:  # fmt: skip
        ctl.io_write(r, v)
    assert ctl.io_read(Reg.STATUS) == 0, "the controller refused the OPEN"
    return out, inb
