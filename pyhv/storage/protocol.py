"""pyhv's synthetic storage protocol, modelled on Hyper-V's storvsp/storvsc (docs/storage.md).

Hyper-V's storvsc sends SCSI request blocks in `vstor_packet`s over a VMBus ring, with the data
buffer named by GPA ranges (`VM_PKT_DATA_USING_GPA_DIRECT`, a `gpa_range` of PFNs), and storvsp
answers each with a status under the same request id. pyhv keeps that shape and drops SCSI: a
request is READ or WRITE of N 512-byte sectors at an LBA into/from the guest's buffer given by
its PFNs, or QUERY_PROPERTIES (the disk's size), in one inband packet whose trans_id is the
request id; the response echoes the id with a status. The host moves the data straight between
the disk and guest memory (no copy through the ring, as with GPA direct); the PFN list travels
inside the inband payload because pyhv's VMBus rings carry inband packets only.

Every layout is declared once as a packed ctypes structure; `decode_request` treats its input
as hostile and says what was wrong (:class:`StorageDecodeError`).
"""

from __future__ import annotations

import ctypes
from enum import IntEnum
from typing import NamedTuple

u16, u32, u64 = ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

#: VMBus interface type: Hyper-V's synthetic SCSI controller (Linux storvsc's id_table).
STORAGE_GUID = "ba6163d9-04a1-4d29-b605-72e2ffb1dc7f"

SECTOR_SIZE = 512
PAGE_SIZE = 4096
#: The largest transfer one request may ask for (storvsc's default max_transfer_bytes is 512 KiB
#: on Hyper-V; pyhv's rings and the guest's CPL0 copies favour small ones).
MAX_TRANSFER = 64 << 10
#: A buffer of MAX_TRANSFER bytes at any offset in its first page spans this many pages.
MAX_PFNS = MAX_TRANSFER // PAGE_SIZE + 1
#: The most one UNMAP may cover (it moves no data).
MAX_UNMAP = 64 << 20
#: Data bytes per ring direction the host suggests (the guest may choose another size).
RING_DATA_BYTES = 16 << 10


class Operation(IntEnum):
    QUERY_PROPERTIES = 1
    READ = 2
    WRITE = 3
    #: The guest no longer needs these sectors (SCSI UNMAP / TRIM, which storvsc sends too):
    #: whole 4 KiB blocks only, no buffer; the host punches them out of its file.
    UNMAP = 4


class Status(IntEnum):
    """What the host answers; anything but SUCCESS means nothing was transferred."""

    SUCCESS = 0
    INVALID_REQUEST = 1  # malformed: short, reserved bits set, byte count and PFNs disagree
    UNKNOWN_OPERATION = 2
    LBA_OUT_OF_RANGE = 3  # LBA + sector count beyond the disk
    BAD_BUFFER = 4  # a PFN outside guest RAM, or ballooned
    TOO_LARGE = 5  # more than MAX_TRANSFER bytes
    IO_ERROR = 6  # the host file failed


class _S(ctypes.LittleEndianStructure):
    _pack_ = 1


class RequestHeader(_S):
    """`storage_request`: the fixed part; `pfn_count` u64 PFNs follow (gpa_range's pfn_array)."""

    _fields_ = [
        ("operation", u16),
        ("flags", u16),  # reserved, zero
        ("sector_count", u32),
        ("lba", u64),
        ("byte_offset", u32),  # into the first page of the buffer (gpa_range.byte_offset)
        ("pfn_count", u32),
    ]


class Response(_S):
    """`storage_response`, sent with the request's trans_id."""

    _fields_ = [
        ("operation", u16),  # echoed
        ("reserved", u16),
        ("status", u32),
        ("value", u64),  # bytes transferred; QUERY_PROPERTIES: the disk's sectors
        ("sector_size", u32),
        ("max_transfer", u32),
    ]


assert ctypes.sizeof(RequestHeader) == 24 and RequestHeader.lba.offset == 8
assert RequestHeader.byte_offset.offset == 16 and RequestHeader.pfn_count.offset == 20
assert ctypes.sizeof(Response) == 24 and Response.value.offset == 8
assert Response.sector_size.offset == 16 and Response.max_transfer.offset == 20
#: The largest request: the header and MAX_PFNS PFNs.
MAX_REQUEST = ctypes.sizeof(RequestHeader) + 8 * MAX_PFNS


class StorageDecodeError(ValueError):
    """A request that is not one; `status` is what the host answers."""

    def __init__(self, status: Status, why: str) -> None:
        self.status = status
        super().__init__(why)


class Request(NamedTuple):
    operation: int
    sector_count: int
    lba: int
    byte_offset: int
    pfns: tuple[int, ...]

    @property
    def byte_count(self) -> int:
        return self.sector_count * SECTOR_SIZE


def pages_spanned(byte_offset: int, byte_count: int) -> int:
    """Pages a buffer of `byte_count` bytes starting `byte_offset` into its first page covers."""
    return (byte_offset + byte_count + PAGE_SIZE - 1) // PAGE_SIZE


def encode_request(
    operation: int, lba: int = 0, sector_count: int = 0, pfns: tuple[int, ...] = (), offset: int = 0
) -> bytes:
    head = RequestHeader(
        operation=operation,
        sector_count=sector_count,
        lba=lba,
        byte_offset=offset,
        pfn_count=len(pfns),
    )
    return bytes(head) + b"".join(p.to_bytes(8, "little") for p in pfns)


def decode_request(payload: bytes) -> Request:
    """A guest's request, checked for shape (the VSP checks it against the disk and RAM).
    The payload may carry the ring's zero pad to 8 bytes after the PFNs."""
    size = ctypes.sizeof(RequestHeader)
    if len(payload) < size:
        raise StorageDecodeError(
            Status.INVALID_REQUEST,
            f"request of {len(payload)} bytes, shorter than its {size}-byte header",
        )
    h = RequestHeader.from_buffer_copy(payload)
    op = h.operation
    if op not in Operation._value2member_map_:
        raise StorageDecodeError(Status.UNKNOWN_OPERATION, f"unknown operation {op}")
    if h.flags:
        raise StorageDecodeError(Status.INVALID_REQUEST, f"reserved flags {h.flags:#x} are set")
    if op == Operation.QUERY_PROPERTIES:
        return Request(op, 0, 0, 0, ())
    if op == Operation.UNMAP:
        return _unmap(h)
    byte_count = h.sector_count * SECTOR_SIZE
    if byte_count > MAX_TRANSFER or h.pfn_count > MAX_PFNS:
        raise StorageDecodeError(
            Status.TOO_LARGE,
            f"{h.sector_count} sectors in {h.pfn_count} pages: at most {MAX_TRANSFER} bytes "
            f"({MAX_TRANSFER // SECTOR_SIZE} sectors) per request",
        )
    if h.sector_count == 0:
        raise StorageDecodeError(Status.INVALID_REQUEST, "a transfer of 0 sectors")
    if h.byte_offset >= PAGE_SIZE:
        raise StorageDecodeError(
            Status.INVALID_REQUEST, f"byte offset {h.byte_offset} is not inside the first page"
        )
    need = pages_spanned(h.byte_offset, byte_count)
    if h.pfn_count != need:
        raise StorageDecodeError(
            Status.INVALID_REQUEST,
            f"{h.pfn_count} PFNs for {byte_count} bytes at offset {h.byte_offset}: it spans {need}",
        )
    end = size + 8 * need
    if len(payload) < end:
        raise StorageDecodeError(
            Status.INVALID_REQUEST,
            f"request of {len(payload)} bytes lists {need} PFNs ({end} bytes)",
        )
    pfns = tuple(int.from_bytes(payload[o : o + 8], "little") for o in range(size, end, 8))
    return Request(op, h.sector_count, h.lba, h.byte_offset, pfns)


def _unmap(h: RequestHeader) -> Request:
    byte_count = h.sector_count * SECTOR_SIZE
    if byte_count > MAX_UNMAP:
        raise StorageDecodeError(
            Status.TOO_LARGE, f"UNMAP of {h.sector_count} sectors: at most {MAX_UNMAP} bytes"
        )
    if h.pfn_count or h.byte_offset:
        raise StorageDecodeError(Status.INVALID_REQUEST, "UNMAP names no buffer")
    block = PAGE_SIZE // SECTOR_SIZE
    if not h.sector_count or h.sector_count % block or h.lba % block:
        raise StorageDecodeError(
            Status.INVALID_REQUEST,
            f"UNMAP of {h.sector_count} sectors at LBA {h.lba}: whole 4 KiB blocks only",
        )
    return Request(Operation.UNMAP, h.sector_count, h.lba, 0, ())


def encode_response(operation: int, status: Status, value: int = 0) -> bytes:
    return bytes(
        Response(
            operation=operation & 0xFFFF,
            status=int(status),
            value=value,
            sector_size=SECTOR_SIZE,
            max_transfer=MAX_TRANSFER,
        )
    )


def decode_response(payload: bytes) -> Response:
    """For tests and tools: the host's answer."""
    if len(payload) < ctypes.sizeof(Response):
        raise ValueError(
            f"response of {len(payload)} bytes, shorter than {ctypes.sizeof(Response)}"
        )
    return Response.from_buffer_copy(payload)
