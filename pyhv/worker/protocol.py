"""The worker's local-socket framing: length-prefixed JSON messages over a stream socket.

A frame is a 4-byte little-endian length and that many bytes of JSON, at most
:data:`MAX_MESSAGE`. The messages a worker and its owner exchange are declared in
pyhv.worker.messages (:func:`send_message`, :func:`recv_frame` and its decoders), on the
worker's control socket (pyhv.worker.control) too; :func:`send` and :func:`recv` frame plain
JSON objects (tests speak the wire with them).
A frame longer than the limit is skipped and refused (:class:`FrameRefused`): the connection
stays usable and the receiver goes on.
"""

from __future__ import annotations

import json
import socket
import struct

MAX_MESSAGE = 1 << 20
_LEN = struct.Struct("<I")


class ProtocolError(ValueError):
    """The peer sent something that is not a valid message."""


class FrameRefused(ProtocolError):
    """A frame was refused (too long) and skipped; the next frame can be read."""


def send(sock: socket.socket, message: dict[str, object]) -> None:
    send_frame(sock, json.dumps(message, separators=(",", ":")).encode())


def send_frame(sock: socket.socket, raw: bytes) -> None:
    if len(raw) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(raw)} bytes exceeds {MAX_MESSAGE}: send less at once")
    sock.sendall(_LEN.pack(len(raw)) + raw)


def send_message(sock: socket.socket, message: object) -> None:
    """Send one declared message (a Struct of pyhv.worker.messages)."""
    from pyhv.worker.messages import encode

    send_frame(sock, encode(message))  # type: ignore[arg-type]


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


def _skip(sock: socket.socket, n: int) -> None:
    while n > 0:
        chunk = sock.recv(min(n, 1 << 16))
        if not chunk:
            raise ProtocolError("connection closed inside a refused (too long) message")
        n -= len(chunk)


def recv_frame(sock: socket.socket) -> bytes | None:
    """The next frame's bytes, or None when the peer closed the connection. A frame longer than
    MAX_MESSAGE is read past and refused with FrameRefused (the next one can be read)."""
    head = _recv_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        _skip(sock, n)
        raise FrameRefused(f"message length {n} exceeds {MAX_MESSAGE}: skipped")
    body = _recv_exact(sock, n)
    if body is None:
        raise ProtocolError("connection closed after a message header")
    return body


def recv(sock: socket.socket) -> dict[str, object] | None:
    """The next JSON object, or None when the peer closed the connection."""
    body = recv_frame(sock)
    if body is None:
        return None
    try:
        msg = json.loads(body)
    except ValueError as e:
        raise ProtocolError(f"message is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"message is a {type(msg).__name__}, not an object")
    return msg
