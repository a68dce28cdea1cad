"""The migration stream: versioned, framed, every frame checksummed, authenticated at connect.

A frame is a 32-byte little-endian header and a payload::

    type u8 | flags u8 | reserved u16 | seq u32 | length u32 | count u32 | addr u64 | check u64

`length` is the payload's size on the wire, `count` a frame-type specific number (pages of a
PAGES frame, bytes before compression), `addr` a guest physical address, `seq` counts frames
from 0 in each direction (a lost or repeated frame is caught), and `check` is the xxh3-64 of the
payload seeded with the xxh3-64 of the header's other fields (so a flipped header bit is caught
too). Control frames carry one JSON object, declared in pyhv.migration.frames; PAGES frames carry raw page bytes (zstd-compressed
when flags has COMPRESSED); ZERO frames carry (gpa u64, pages u64) runs of zero pages.

Authentication (a shared token, never sent): the destination sends HELLO with a random nonce;
the source answers AUTH with its own nonce and HMAC-SHA256(token, "pyhv-migration/source" +
nonces); the destination checks it and answers AUTH_OK with HMAC(token, "pyhv-migration/
destination" + nonces), which the source checks in turn. Until then frames are at most 64 KiB.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import xxhash
from msgspec import Struct

from pyhv.migration import frames

VERSION = 1
HEADER = struct.Struct("<BBHIIIQQ")
assert HEADER.size == 32
_HEAD_NO_CHECK = struct.Struct("<BBHIIIQ")
MAX_FRAME = 8 << 20
MAX_UNAUTHENTICATED = 64 << 10
COMPRESSED = 0x01
_ZERO_RUN = struct.Struct("<QQ")


class Frame(enum.IntEnum):
    """Frame types; a control frame's body is the Struct of pyhv.migration.frames named here."""

    HELLO = 1  # dest -> src: Hello {"version", "nonce"}
    AUTH = 2  # src -> dest: Auth {"version", "nonce", "mac"}
    AUTH_OK = 3  # dest -> src: AuthOk {"mac"}
    CONFIG = 4  # src -> dest: Config {"config", "regions", "options", "dynmem"}
    READY = 5  # dest -> src: Empty; the VM exists, send memory
    PAGES = 6  # src -> dest: addr = gpa, count = pages, payload = page bytes
    ZERO = 7  # src -> dest: (gpa, pages) runs of zero pages
    PASS_END = 8  # src -> dest: PassEnd {"pass", "pages"}
    STATE = 9  # src -> dest: the VM's state (pyhv.migration.state)
    CHECKSUM = 10  # src -> dest: Checksum {"ram": hex} checksum of all RAM at pause
    RESTORED = 11  # dest -> src: Empty; state restored, RAM identical
    COMMIT = 12  # src -> dest: Empty; resume
    RESUMED = 13  # dest -> src: Resumed {"time": monotonic, "start_ms"} the VPs run there
    ABORT = 14  # either way: Abort {"reason"}; the sender gives up
    EXTENTS = 15  # src -> dest: (gpa, pages) runs pass 1 will send (to back them ahead)


_B = TypeVar("_B", bound=Struct)


class MigrationError(RuntimeError):
    """Migration failed; `phase` says where, the message says what happened."""

    def __init__(self, message: str, phase: str = "") -> None:
        super().__init__(message)
        self.phase = phase


class PeerAborted(MigrationError):
    """The other side sent ABORT with its reason."""


def _check(head: bytes, payload: bytes | bytearray | memoryview) -> int:
    return xxhash.xxh3_64_intdigest(payload, seed=xxhash.xxh3_64_intdigest(head))


class FrameSocket:
    """One side of the stream over a connected socket: send and receive checksummed frames.

    Sending counts bytes and honours a bandwidth limit (bytes/s; 0 = none). `fault` is the
    test-only injection hook (see pyhv.migration.faults): called with each frame type sent, it
    may corrupt or cut the stream.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        bandwidth: int = 0,
        timeout: float = 30.0,
        fault: Callable[[FrameSocket, Frame, int], None] | None = None,
        peer: str = "peer",
    ) -> None:
        self.sock = sock
        self.peer = peer
        sock.settimeout(timeout)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.bandwidth = bandwidth
        self.authenticated = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self._seq_out = 0
        self._seq_in = 0
        self._head = bytearray(HEADER.size)
        self._fault = fault
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self.corrupt_next = False  # set by a fault plan: flip a payload bit of the next frame

    # --- sending ---------------------------------------------------------------------------

    def send(
        self,
        ftype: Frame,
        payload: bytes | bytearray | memoryview = b"",
        *,
        count: int = 0,
        addr: int = 0,
        flags: int = 0,
    ) -> None:
        with self._lock:
            if self._fault is not None:
                self._fault(self, ftype, self.frames_sent)
            head = _HEAD_NO_CHECK.pack(ftype, flags, 0, self._seq_out, len(payload), count, addr)
            check = _check(head, payload)
            if self.corrupt_next and len(payload):
                self.corrupt_next = False
                bad = bytearray(payload)
                bad[len(bad) // 2] ^= 0x40
                payload = bad
            header = HEADER.pack(ftype, flags, 0, self._seq_out, len(payload), count, addr, check)
            self._seq_out = (self._seq_out + 1) & 0xFFFFFFFF
            self._sendall(header, payload)
            self.frames_sent += 1

    def send_json(self, ftype: Frame, obj: Struct | dict[str, Any]) -> None:
        """A control frame: its declared body (pyhv.migration.frames), or any JSON object."""
        if isinstance(obj, Struct):
            self.send(ftype, frames.encode(obj))
        else:
            self.send(ftype, json.dumps(obj, separators=(",", ":")).encode())

    def _sendall(self, header: bytes, payload: bytes | bytearray | memoryview) -> None:
        n = len(header) + len(payload)
        parts = [memoryview(header), memoryview(payload).cast("B")]
        while parts:
            sent = self.sock.sendmsg(parts)
            while sent and parts:
                if sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                else:
                    parts[0] = parts[0][sent:]
                    sent = 0
            if parts and not len(parts[0]):
                parts.pop(0)
        self.bytes_sent += n
        if self.bandwidth > 0:
            self._window_bytes += n
            due = self._window_start + self._window_bytes / self.bandwidth
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            elif wait < -1.0:  # idle for a while: do not let a burst make up for it
                self._window_start, self._window_bytes = time.monotonic(), 0

    # --- receiving -------------------------------------------------------------------------

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise ConnectionError(
                    f"the peer closed the connection ({got} of {len(view)} bytes of a frame read)"
                )
            got += n
        self.bytes_received += len(view)

    def recv_header(self) -> tuple[Frame, int, int, int, int, int]:
        """(type, flags, length, count, addr, check) of the next frame."""
        view = memoryview(self._head)
        self._recv_into(view)
        ftype, flags, _res, seq, length, count, addr, check = HEADER.unpack(self._head)
        limit = MAX_FRAME if self.authenticated else MAX_UNAUTHENTICATED
        if seq != self._seq_in:
            raise MigrationError(
                f"frame sequence {seq} where {self._seq_in} was due: frames were lost or repeated"
            )
        try:
            ft = Frame(ftype)
        except ValueError:
            raise MigrationError(
                f"unknown frame type {ftype}: not a pyhv migration stream"
            ) from None
        if length > limit:
            raise MigrationError(f"{ft.name} frame of {length} bytes exceeds the limit {limit}")
        self._seq_in = (self._seq_in + 1) & 0xFFFFFFFF
        return ft, flags, length, count, addr, check

    def recv_payload_into(
        self, view: memoryview, ftype: Frame, flags: int, count: int, addr: int, check: int
    ) -> None:
        """Read the payload into `view` (exactly its size) and verify the frame's checksum."""
        self._recv_into(view)
        head = _HEAD_NO_CHECK.pack(
            ftype, flags, 0, (self._seq_in - 1) & 0xFFFFFFFF, len(view), count, addr
        )
        if _check(head, view) != check:
            raise MigrationError(
                f"{ftype.name} frame #{self._seq_in - 1} ({len(view)} bytes at {addr:#x}) "
                "failed its checksum: the stream was corrupted"
            )

    def recv(self) -> tuple[Frame, int, int, int, bytes]:
        """A whole frame: (type, flags, count, addr, payload), checksum verified. ABORT frames
        raise PeerAborted with the peer's reason."""
        ftype, flags, length, count, addr, check = self.recv_header()
        buf = bytearray(length)
        self.recv_payload_into(memoryview(buf), ftype, flags, count, addr, check)
        if ftype is Frame.ABORT:
            try:
                reason = frames.decode(bytes(buf), frames.Abort, "ABORT").reason
            except frames.FrameError as e:
                reason = f"(no readable reason: {e})"
            raise PeerAborted(f"the {self.peer} aborted: {reason}")
        return ftype, flags, count, addr, bytes(buf)

    def expect(self, want: Frame, kind: type[_B], phase: str = "") -> _B:
        """The next frame, which must be a `want` frame whose body decodes as `kind`;
        MigrationError (in `phase`) names the frame and the field otherwise."""
        ftype, _flags, _count, _addr, payload = self.recv()
        if ftype is not want:
            raise MigrationError(f"expected a {want.name} frame, got {ftype.name}", phase)
        try:
            return frames.decode(payload, kind, ftype.name)  # type: ignore[no-any-return]
        except frames.FrameError as e:
            raise MigrationError(str(e), phase) from None

    def abort(self, reason: str) -> None:
        """Tell the peer why we give up (best effort: the connection may be gone)."""
        try:
            self.sock.settimeout(1.0)
            self.send_json(Frame.ABORT, frames.Abort(reason[:65536]))
        except (OSError, MigrationError):
            pass

    def close(self, reset: bool = False) -> None:
        """Close; with `reset`, abortively (RST): a peer blocked sending into a full window
        would otherwise wait for its timeout to learn we are gone."""
        try:
            if reset:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()
        except OSError:
            pass


def pack_zero_runs(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(_ZERO_RUN.pack(g, n) for g, n in runs)


def unpack_zero_runs(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % _ZERO_RUN.size:
        raise MigrationError(f"ZERO frame of {len(payload)} bytes is not a list of 16-byte runs")
    return [r for r in _ZERO_RUN.iter_unpack(payload)]


# --- authentication -------------------------------------------------------------------------


def _mac(token: bytes, role: bytes, first: bytes, second: bytes) -> str:
    return hmac.new(token, b"pyhv-migration/" + role + first + second, hashlib.sha256).hexdigest()


def _same_mac(want: str, given: object) -> bool:
    """Constant-time comparison with the peer's MAC, whatever JSON value it sent (compare_digest
    raises TypeError on str with non-ASCII characters: compare bytes)."""
    return hmac.compare_digest(want.encode(), str(given).encode())


def authenticate_destination(fs: FrameSocket, token: bytes) -> None:
    """The destination's half of the challenge; raises MigrationError if the source fails it."""
    nonce_d = secrets.token_bytes(32)
    fs.send_json(Frame.HELLO, frames.Hello(VERSION, nonce_d.hex()))
    failed = "authentication failed: the source does not hold this host's migration token"
    try:
        msg = fs.expect(Frame.AUTH, frames.Auth, "authenticate")
    except PeerAborted:
        raise
    except MigrationError as e:  # a malformed AUTH is a failed one
        fs.abort(failed)
        raise MigrationError(
            f"authentication failed: the connecting source's AUTH is malformed: {e}",
            "authenticate",
        ) from None
    if msg.version != VERSION:
        fs.abort(f"stream version {msg.version} is not {VERSION}")
        raise MigrationError(
            f"the source speaks stream version {msg.version}, this host {VERSION}",
            "authenticate",
        )
    nonce_s = bytes.fromhex(msg.nonce)
    want = _mac(token, b"source", nonce_d, nonce_s)
    if not _same_mac(want, msg.mac):
        fs.abort(failed)
        raise MigrationError(
            "authentication failed: the connecting source does not hold the migration token",
            "authenticate",
        )
    fs.send_json(Frame.AUTH_OK, frames.AuthOk(_mac(token, b"destination", nonce_s, nonce_d)))
    fs.authenticated = True


def authenticate_source(fs: FrameSocket, token: bytes) -> None:
    """The source's half; raises MigrationError if the destination refuses or fails it."""
    try:
        hello = fs.expect(Frame.HELLO, frames.Hello, "authenticate")
        if hello.version != VERSION:
            raise MigrationError(
                f"the destination speaks stream version {hello.version}, this host {VERSION}",
                "authenticate",
            )
        nonce_d = bytes.fromhex(hello.nonce)
        nonce_s = secrets.token_bytes(32)
        mac = _mac(token, b"source", nonce_d, nonce_s)
        fs.send_json(Frame.AUTH, frames.Auth(VERSION, nonce_s.hex(), mac))
        ok = fs.expect(Frame.AUTH_OK, frames.AuthOk, "authenticate")
    except PeerAborted as e:
        raise MigrationError(str(e), "authenticate") from None
    if not _same_mac(_mac(token, b"destination", nonce_s, nonce_d), ok.mac):
        raise MigrationError(
            "the destination failed authentication: it does not hold the migration token",
            "authenticate",
        )
    fs.authenticated = True


def token_bytes(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if len(raw) < 8:
        raise MigrationError(
            f"a migration token of {len(raw)} bytes is too short: use at least 8 (e.g. 32 random hex digits)"
        )
    return raw
