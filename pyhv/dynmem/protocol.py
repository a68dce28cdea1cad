"""The Hyper-V Dynamic Memory protocol, byte for byte (reference/dynamic-memory-protocol.md).

Types from 0x8000 are pyhv's extension, which Hyper-V's protocol does not have: the guest's
free-page hints (FREE_PAGE_HINT and its response), what Linux's hv_balloon reports with the
HvExtCallMemoryHeatHint hypercall instead; a guest sends them only to a host that set
`free_page_hints` (bit 3) in its capabilities response (docs/dynamic-memory.md).

Each message is declared once as a packed little-endian ctypes structure; `encode` and `decode`
both come from that declaration. `decode` treats its input as hostile: it checks the header,
the size for the type, and the range counts, and raises `DmDecodeError` saying what was wrong.
"""

from __future__ import annotations

import ctypes
import struct
from enum import IntEnum
from typing import NamedTuple

from pyhv.memory.ranges import PageRange

u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

#: VMBus interface type of the Dynamic Memory device (little-endian GUID on the wire).
DM_GUID = "525074dc-8985-46e2-8057-a307dc18a502"

#: The largest message either side sends: the guest's receive buffer is one page.
MAX_MESSAGE = 4096


class Version(IntEnum):
    """`major << 16 | minor`."""

    WIN7 = 0x00000003
    WIN8 = 0x00010000
    WIN10 = 0x00020000


class MessageType(IntEnum):
    ERROR = 0
    VERSION_REQUEST = 1
    VERSION_RESPONSE = 2
    CAPABILITIES_REPORT = 3
    CAPABILITIES_RESPONSE = 4
    STATUS_REPORT = 5
    BALLOON_REQUEST = 6
    BALLOON_RESPONSE = 7
    UNBALLOON_REQUEST = 8
    UNBALLOON_RESPONSE = 9
    MEM_HOT_ADD_REQUEST = 10
    MEM_HOT_ADD_RESPONSE = 11
    INFO_MESSAGE = 12
    MEM_HOT_REMOVE_REQUEST = 13
    MEM_HOT_REMOVE_RESPONSE = 14
    #: pyhv's extension: ranges of whole free 2 MiB blocks the guest gives back (G->H) ...
    FREE_PAGE_HINT = 0x8000
    #: ... and the host's answer, once it has discarded them (H->G)
    FREE_PAGE_HINT_RESPONSE = 0x8001


_U64 = struct.Struct("<Q")
INFO_TYPE_MAX_PAGE_CNT = 0
#: Largest page count of one `dm_mem_page_range` (24 bits) and largest PFN (40 bits).
MAX_RANGE_PAGES = (1 << 24) - 1
MAX_PFN = (1 << 40) - 1


class _S(ctypes.LittleEndianStructure):
    _pack_ = 1


class DmHeader(_S):
    _fields_ = [("type", u16), ("size", u16), ("trans_id", u32)]


class DmMemPageRange(_S):
    """`union dm_mem_page_range`: bits 0-39 start_page, bits 40-63 page_cnt."""

    _fields_ = [("start_page", u64, 40), ("page_cnt", u64, 24)]


class DmVersionRequest(_S):
    _fields_ = [
        ("hdr", DmHeader),
        ("version", u32),
        ("is_last_attempt", u32, 1),
        ("reservedz", u32, 31),
    ]


class DmVersionResponse(_S):
    _fields_ = [("hdr", DmHeader), ("is_accepted", u64, 1), ("reservedz", u64, 63)]


class DmCapabilities(_S):
    _fields_ = [
        ("hdr", DmHeader),
        ("balloon", u64, 1),
        ("hot_add", u64, 1),
        ("hot_add_alignment", u64, 4),
        ("hot_remove", u64, 1),
        ("reservedz", u64, 57),
        ("min_page_cnt", u64),
        ("max_page_number", u64),
    ]


class DmCapabilitiesResponse(_S):
    _fields_ = [
        ("hdr", DmHeader),
        ("is_accepted", u64, 1),
        ("hot_remove", u64, 1),
        ("suppress_pressure_reports", u64, 1),
        ("free_page_hints", u64, 1),  # pyhv's extension: the host takes FREE_PAGE_HINT
        ("reservedz", u64, 60),
    ]


class DmStatus(_S):
    _fields_ = [
        ("hdr", DmHeader),
        ("num_avail", u64),
        ("num_committed", u64),
        ("page_file_size", u64),
        ("zero_free", u64),
        ("page_file_writes", u32),
        ("io_diff", u32),
    ]


class DmBalloon(_S):
    _fields_ = [("hdr", DmHeader), ("num_pages", u32), ("reservedz", u32)]


class DmBalloonResponse(_S):
    """Followed by `range_count` DmMemPageRange."""

    _fields_ = [
        ("hdr", DmHeader),
        ("reservedz", u32),
        ("more_pages", u32, 1),
        ("range_count", u32, 31),
    ]


class DmUnballoonRequest(_S):
    """Followed by `range_count` DmMemPageRange."""

    _fields_ = [
        ("hdr", DmHeader),
        ("more_pages", u32, 1),
        ("reservedz", u32, 31),
        ("range_count", u32),
    ]


class DmUnballoonResponse(_S):
    _fields_ = [("hdr", DmHeader)]


class DmHotAdd(_S):
    _fields_ = [("hdr", DmHeader), ("range", DmMemPageRange)]


class DmHotAddWithRegion(_S):
    _fields_ = [("hdr", DmHeader), ("range", DmMemPageRange), ("region", DmMemPageRange)]


class DmHotAddResponse(_S):
    _fields_ = [("hdr", DmHeader), ("page_count", u32), ("result", u32)]


#: dm_hot_remove.qos_flags: whole large (2 MiB) pages only; memory of the local NUMA node.
QOS_LARGE = 1
QOS_LOCAL = 2


class DmHotRemove(_S):
    _fields_ = [
        ("hdr", DmHeader),
        ("virtual_node", u32),
        ("page_count", u32),
        ("qos_flags", u32),
        ("reservedz", u32),
    ]


class DmHotRemoveResponse(_S):
    """Followed by `range_count` DmMemPageRange."""

    _fields_ = [
        ("hdr", DmHeader),
        ("result", u32),
        ("range_count", u32),
        ("more_pages", u64, 1),
        ("reservedz", u64, 63),
    ]


class DmInfoMsg(_S):
    """Followed by `info_size` bytes: DmInfoHeader + data, repeated."""

    _fields_ = [("hdr", DmHeader), ("reserved", u32), ("info_size", u32)]


class DmFreePageHint(_S):
    """pyhv's extension. Followed by `range_count` DmMemPageRange: runs of whole free 2 MiB
    blocks (start and count multiples of 512 pages), kept out of the guest's allocator until
    the response."""

    _fields_ = [("hdr", DmHeader), ("reservedz", u32), ("range_count", u32)]


class DmFreePageHintResponse(_S):
    """pyhv's extension: the pages the host discarded and the ranges it refused."""

    _fields_ = [("hdr", DmHeader), ("discarded_pages", u32), ("refused_ranges", u32)]


class DmInfoHeader(_S):
    _fields_ = [("type", u32), ("data_size", u32)]


# Sizes and offsets of the reference tables (2.3).
for _cls, _size in [
    (DmHeader, 8),
    (DmMemPageRange, 8),
    (DmVersionRequest, 16),
    (DmVersionResponse, 16),
    (DmCapabilities, 32),
    (DmCapabilitiesResponse, 16),
    (DmStatus, 48),
    (DmBalloon, 16),
    (DmBalloonResponse, 16),
    (DmUnballoonRequest, 16),
    (DmUnballoonResponse, 8),
    (DmHotAdd, 16),
    (DmHotAddWithRegion, 24),
    (DmHotAddResponse, 16),
    (DmHotRemove, 24),
    (DmHotRemoveResponse, 24),
    (DmInfoMsg, 16),
    (DmInfoHeader, 8),
    (DmFreePageHint, 16),
    (DmFreePageHintResponse, 16),
]:
    assert ctypes.sizeof(_cls) == _size, (_cls.__name__, ctypes.sizeof(_cls))
assert DmStatus.page_file_writes.offset == 40 and DmStatus.io_diff.offset == 44
assert DmCapabilities.min_page_cnt.offset == 16 and DmCapabilities.max_page_number.offset == 24
assert DmHotAddResponse.result.offset == 12 and DmHotRemoveResponse.more_pages.offset == 16
assert DmUnballoonRequest.range_count.offset == 12 and DmInfoMsg.info_size.offset == 12

_BODY: dict[MessageType, type[_S]] = {
    MessageType.VERSION_REQUEST: DmVersionRequest,
    MessageType.VERSION_RESPONSE: DmVersionResponse,
    MessageType.CAPABILITIES_REPORT: DmCapabilities,
    MessageType.CAPABILITIES_RESPONSE: DmCapabilitiesResponse,
    MessageType.STATUS_REPORT: DmStatus,
    MessageType.BALLOON_REQUEST: DmBalloon,
    MessageType.BALLOON_RESPONSE: DmBalloonResponse,
    MessageType.UNBALLOON_REQUEST: DmUnballoonRequest,
    MessageType.UNBALLOON_RESPONSE: DmUnballoonResponse,
    MessageType.MEM_HOT_ADD_REQUEST: DmHotAdd,
    MessageType.MEM_HOT_ADD_RESPONSE: DmHotAddResponse,
    MessageType.INFO_MESSAGE: DmInfoMsg,
    MessageType.MEM_HOT_REMOVE_REQUEST: DmHotRemove,
    MessageType.MEM_HOT_REMOVE_RESPONSE: DmHotRemoveResponse,
    MessageType.FREE_PAGE_HINT: DmFreePageHint,
    MessageType.FREE_PAGE_HINT_RESPONSE: DmFreePageHintResponse,
}
_WITH_RANGES = {
    MessageType.BALLOON_RESPONSE,
    MessageType.UNBALLOON_REQUEST,
    MessageType.MEM_HOT_REMOVE_RESPONSE,
    MessageType.FREE_PAGE_HINT,
}


class DmDecodeError(ValueError):
    """A Dynamic Memory message that does not follow the protocol."""


class Message(NamedTuple):
    """A decoded message: its fixed part, and the page ranges or info bytes that follow it."""

    type: MessageType
    body: _S
    ranges: tuple[PageRange, ...] = ()
    info: bytes = b""

    @property
    def trans_id(self) -> int:
        return int(self.body.hdr.trans_id)

    def fields(self) -> dict[str, int]:
        """The fixed part field by field, as declared (without the header and the reserved
        bits; a page range as `NAME_start_page` and `NAME_page_cnt`)."""
        return _fields(self.body)


def _fields(body: ctypes.Structure) -> dict[str, int]:
    out: dict[str, int] = {}
    for spec in body._fields_:
        name = spec[0]
        if name == "hdr" or name.startswith("reserved"):
            continue
        v = getattr(body, name)
        if isinstance(v, ctypes.Structure):
            for k, x in _fields(v).items():
                out[f"{name}_{k}"] = x
        else:
            out[name] = int(v)
    return out


def _range_to_wire(r: PageRange) -> DmMemPageRange:
    start, count = r
    if not (0 <= start <= MAX_PFN and 0 <= count <= MAX_RANGE_PAGES):
        raise ValueError(
            f"page range start={start:#x} count={count} does not fit dm_mem_page_range "
            f"(start < 2^40, count < 2^24): split it"
        )
    return DmMemPageRange(start_page=start, page_cnt=count)


def encode(
    mtype: MessageType,
    body: _S,
    *,
    trans_id: int = 0,
    ranges: tuple[PageRange, ...] | list[PageRange] = (),
    info: bytes = b"",
) -> bytes:
    """Bytes of one message: sets hdr.type, hdr.size and hdr.trans_id (and range_count for the
    messages that carry ranges, info_size for the info message)."""
    mtype = MessageType(mtype)
    if not isinstance(body, _BODY[mtype]) and not (
        mtype is MessageType.MEM_HOT_ADD_REQUEST and isinstance(body, DmHotAddWithRegion)
    ):
        raise TypeError(f"{mtype.name} needs a {_BODY[mtype].__name__}, not {type(body).__name__}")
    if ranges and mtype not in _WITH_RANGES:
        raise ValueError(f"{mtype.name} carries no page ranges")
    if info and mtype is not MessageType.INFO_MESSAGE:
        raise ValueError(f"{mtype.name} carries no info data")
    tail = b"".join(bytes(_range_to_wire(r)) for r in ranges) + info
    size = ctypes.sizeof(body) + len(tail)
    if size > MAX_MESSAGE:
        raise ValueError(f"{mtype.name} of {size} bytes exceeds {MAX_MESSAGE}: send fewer ranges")
    body.hdr.type = mtype
    body.hdr.size = size
    body.hdr.trans_id = trans_id
    if mtype in _WITH_RANGES:
        body.range_count = len(ranges)  # type: ignore[attr-defined]
    if mtype is MessageType.INFO_MESSAGE:
        body.info_size = len(info)  # type: ignore[attr-defined]
    return bytes(body) + tail


def decode(buf: bytes | bytearray | memoryview) -> Message:
    """Decode one message from a received packet payload (which may carry trailing pad bytes:
    hdr.size says where the message ends)."""
    n = len(buf)
    if n < ctypes.sizeof(DmHeader):
        raise DmDecodeError(f"message of {n} bytes is shorter than the 8-byte dm_header")
    hdr = DmHeader.from_buffer_copy(buf[:8])
    size = hdr.size
    if size < 8 or size > n or size > MAX_MESSAGE:
        raise DmDecodeError(
            f"dm_header.size={size} with {n} bytes received: must be 8..{min(n, MAX_MESSAGE)}"
        )
    try:
        mtype = MessageType(hdr.type)
    except ValueError:
        raise DmDecodeError(f"unknown message type {hdr.type}") from None
    if mtype is MessageType.ERROR:
        raise DmDecodeError("DM_ERROR (type 0) is not a message either side sends")
    data = bytes(buf[:size])
    cls: type[_S] = _BODY[mtype]
    if mtype is MessageType.MEM_HOT_ADD_REQUEST and size == ctypes.sizeof(DmHotAddWithRegion):
        cls = DmHotAddWithRegion
    fixed = ctypes.sizeof(cls)
    if size < fixed:
        raise DmDecodeError(f"{mtype.name} of {size} bytes: at least {fixed} needed")
    body = cls.from_buffer_copy(data[:fixed])
    if mtype in _WITH_RANGES:
        count = body.range_count  # type: ignore[attr-defined]
        if size != fixed + 8 * count:
            raise DmDecodeError(
                f"{mtype.name} says range_count={count} but its size {size} holds "
                f"{(size - fixed) / 8:g} ranges"
            )
        # Same bits as DmMemPageRange, unpacked in one pass (a balloon response has 510).
        ranges = tuple(
            PageRange(v & MAX_PFN, v >> 40) for (v,) in _U64.iter_unpack(data[fixed:size])
        )
        return Message(mtype, body, ranges)
    if mtype is MessageType.INFO_MESSAGE:
        if size != fixed + body.info_size:  # type: ignore[attr-defined]
            raise DmDecodeError(
                f"DM_INFO_MESSAGE says info_size={body.info_size} but carries {size - fixed}"  # type: ignore[attr-defined]
            )
        return Message(mtype, body, info=data[fixed:])
    if size != fixed:
        raise DmDecodeError(f"{mtype.name} of {size} bytes: exactly {fixed} expected")
    return Message(mtype, body)


def info_max_page_count(max_pages: int) -> bytes:
    """The info data of DM_INFO_MESSAGE announcing the maximum dynamic page count."""
    return bytes(DmInfoHeader(type=INFO_TYPE_MAX_PAGE_CNT, data_size=8)) + max_pages.to_bytes(
        8, "little"
    )
