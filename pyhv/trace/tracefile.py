"""The trace file: what `pyhv vm trace --out FILE` writes and `pyhv trace show FILE` reads.

Layout: the 8-byte magic ``PYHVTRC\\0``, a little-endian u16 format version and u16 of zero, then
frames of (u32 length, that many bytes of one event's wire form as UTF-8 JSON). A frame is at
most MAX_FRAME bytes and a writer stops at its byte limit, so a file is bounded; the reader
checks the magic, the version, every length and every event, and says where a file went wrong.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import BinaryIO

from pyhv.trace.events import Event, TraceError, event_from_wire

MAGIC = b"PYHVTRC\0"
VERSION = 1
_HEADER = struct.Struct("<8sHH")
_LEN = struct.Struct("<I")
MAX_FRAME = 64 << 10
DEFAULT_MAX_BYTES = 256 << 20


class TraceWriter:
    """Appends events to a new trace file until `max_bytes`; then `full` is True and
    further events are counted in `skipped`."""

    def __init__(self, f: BinaryIO, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._f = f
        self.max_bytes = max_bytes
        f.write(_HEADER.pack(MAGIC, VERSION, 0))
        self.size = _HEADER.size
        self.written = 0
        self.skipped = 0
        self.full = False

    def write(self, event: Event) -> None:
        raw = json.dumps(event.to_wire(), separators=(",", ":")).encode()
        if len(raw) > MAX_FRAME:
            raise TraceError(f"a {event.kind} event of {len(raw)} bytes exceeds {MAX_FRAME}")
        if self.full or self.size + _LEN.size + len(raw) > self.max_bytes:
            self.full = True
            self.skipped += 1
            return
        self._f.write(_LEN.pack(len(raw)) + raw)
        self.size += _LEN.size + len(raw)
        self.written += 1


def read_events(f: BinaryIO, name: str = "the trace file") -> Iterator[Event]:
    """The events of a trace file, checked; TraceError (one line: what, where, remedy)."""
    head = f.read(_HEADER.size)
    if len(head) < _HEADER.size or head[:8] != MAGIC:
        raise TraceError(
            f"{name} is not a pyhv trace file (no {MAGIC[:7].decode()} header): "
            "record one with `pyhv vm trace NAME --out FILE`"
        )
    _, version, _ = _HEADER.unpack(head)
    if version != VERSION:
        raise TraceError(
            f"{name} is trace format version {version}; this pyhv reads version {VERSION}: "
            "read it with the pyhv that wrote it"
        )
    offset = _HEADER.size
    index = 0
    while True:
        raw = f.read(_LEN.size)
        if not raw:
            return
        if len(raw) < _LEN.size:
            raise TraceError(f"{name} is truncated at byte {offset} (inside a frame length)")
        (n,) = _LEN.unpack(raw)
        if n == 0 or n > MAX_FRAME:
            raise TraceError(
                f"{name}: frame {index} at byte {offset} says {n} bytes; frames are 1..{MAX_FRAME}"
                ": the file is corrupt"
            )
        body = f.read(n)
        if len(body) < n:
            raise TraceError(
                f"{name} is truncated at byte {offset}: frame {index} has {len(body)} of {n} bytes"
            )
        try:
            wire = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise TraceError(f"{name}: frame {index} at byte {offset} is not JSON ({e})") from None
        try:
            yield event_from_wire(wire)
        except TraceError as e:
            raise TraceError(f"{name}: frame {index} at byte {offset}: {e}") from None
        offset += _LEN.size + n
        index += 1
