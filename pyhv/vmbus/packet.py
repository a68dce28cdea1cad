"""VMBus packets: the 16-byte `vmpacket_descriptor` and the packet types (reference/vmbus.md 3.2)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum


class PacketType(IntEnum):
    """`enum vmbus_packet_type` of Linux include/linux/hyperv.h."""

    INVALID = 0
    SYNCH = 1
    ADD_XFER_PAGESET = 2
    RM_XFER_PAGESET = 3
    ESTABLISH_GPADL = 4
    TEARDOWN_GPADL = 5
    DATA_INBAND = 6
    DATA_USING_XFER_PAGES = 7
    DATA_USING_GPADL = 8
    DATA_USING_GPA_DIRECT = 9
    CANCEL_REQUEST = 0xA
    COMP = 0xB
    DATA_USING_ADDITIONAL_PKT = 0xC
    ADDITIONAL_DATA = 0xD


#: Types a receiver accepts (INVALID never is).
KNOWN_TYPES = frozenset(int(t) for t in PacketType if t is not PacketType.INVALID)

#: `vmpacket_descriptor`: @0 u16 type, @2 u16 offset8, @4 u16 len8, @6 u16 flags, @8 u64 trans_id.
DESCRIPTOR = struct.Struct("<HHHHQ")
assert DESCRIPTOR.size == 16

#: The u64 each writer appends after a packet: the packet's start offset << 32.
TRAILER = struct.Struct("<Q")
assert TRAILER.size == 8

#: `VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED`.
FLAG_COMPLETION_REQUESTED = 1

#: offset8 of an inband packet: the payload follows the 16-byte descriptor.
INBAND_OFFSET8 = DESCRIPTOR.size >> 3


def aligned_packet_len(payload_len: int) -> int:
    """Bytes an inband packet with `payload_len` payload bytes occupies, without the trailer
    (`ALIGN(16 + payload_len, 8)`, as vmbus_sendpacket computes it)."""
    return (DESCRIPTOR.size + payload_len + 7) & ~7


@dataclass(frozen=True, slots=True)
class Packet:
    """One received packet. `payload` is a private copy: the guest cannot change it any more."""

    type: int
    flags: int
    trans_id: int
    payload: bytes

    @property
    def completion_requested(self) -> bool:
        return bool(self.flags & FLAG_COMPLETION_REQUESTED)
