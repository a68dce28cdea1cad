"""The worker's local-socket protocol: length-prefixed JSON messages over a stream socket.

Owner -> worker: ``{"op": "boot", "config": {...}}`` (first), ``{"op": "serial", "data": b64}``,
``{"op": "stop"}``. Worker -> owner: ``{"ev": "started", "pid": n}``,
``{"ev": "serial", "data": b64}``, ``{"ev": "ended", "end": {...VmEnd...}}`` (last).

Dynamic Memory: ``{"op": "memory", "id": n, "call": CALL, "value": int}`` with CALL one of
``status``, ``target`` (bytes), ``add`` / ``remove`` (pages) is answered by
``{"ev": "memory", "id": n, "result": {...}}`` or ``{"ev": "memory", "id": n, "error": text}``;
every status report of the guest (and every goal reached) is pushed as
``{"ev": "memory_status", "status": {...}}``, the status in the wire form of
:class:`pyhv.dynmem.status.MemoryStatus`.

Flight recorder (pyhv.trace): ``{"op": "trace", "on": bool, "kinds": [...] | null}`` starts
(or changes) or stops the stream of the VM's events of those kinds, sent as ``{"ev": "trace", "events": [...]}`` (each the wire form of an event of
:mod:`pyhv.trace.events`; a "dropped" event counts what a slow owner lost).
"""

from __future__ import annotations

import base64
import json
import socket
import struct

MAX_MESSAGE = 1 << 20
_LEN = struct.Struct("<I")


class ProtocolError(ValueError):
    """The peer sent something that is not a valid message."""


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(text: object) -> bytes:
    if not isinstance(text, str):
        raise ProtocolError(f"expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except ValueError as e:
        raise ProtocolError(f"bad base64 data: {e}") from None


def send(sock: socket.socket, message: dict[str, object]) -> None:
    raw = json.dumps(message, separators=(",", ":")).encode()
    if len(raw) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE}: send less at once")
    sock.sendall(_LEN.pack(len(raw)) + raw)


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError(f"connection closed inside a message ({len(buf)} of {n} bytes)")
            return None
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> dict[str, object] | None:
    """The next message, or None when the peer closed the connection."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"message length {n} exceeds {MAX_MESSAGE}")
    body = _recv_exact(sock, n)
    if body is None:
        raise ProtocolError("connection closed after a message header")
    try:
        msg = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, not an object")
    return msg
