"""The migration stream: versioned, framed, authenticated at connect and then frame by frame,
optionally encrypted.

A frame is a 32-byte little-endian header, a payload and, once the handshake is done, a 16-byte
tag::

    type u8 | flags u8 | reserved u16 | seq u32 | length u32 | count u32 | addr u64 | check u64

`length` is the payload's size on the wire, `count` a frame-type specific number (pages of a
PAGES frame, bytes before compression), `addr` a guest physical address, `seq` counts frames
from 0 in each direction (a lost, repeated or reordered frame is caught). Control frames carry
one JSON object, declared in pyhv.migration.frames; PAGES frames carry raw page bytes
(zstd-compressed when flags has COMPRESSED); ZERO frames carry (gpa u64, pages u64) runs of
zero pages.

The handshake (HELLO, AUTH, AUTH_OK) is only checksummed: `check` is the xxh3-64 of the payload
seeded with the xxh3-64 of the header's other fields; what makes it trustworthy is inside it.
The destination sends HELLO with a random nonce; the source answers AUTH with its own nonce, an
ephemeral X25519 public key, whether it wants the stream encrypted, and HMAC-SHA256(token,
"pyhv-migration/source" + mode + nonces + its key); the destination checks it and answers
AUTH_OK with its own X25519 key and HMAC(token, "pyhv-migration/destination" + mode + nonces +
both keys), which the source checks in turn. Until then frames are at most 64 KiB. Both sides
then derive one AES-256-GCM key per direction with HKDF-SHA256 (input: the token and the X25519
shared secret; salt: both nonces; info: the version and the mode; the first 32 bytes seal what
the source sends, the last 32 what the destination sends), so a recorded stream stays sealed
even to a later holder of the token (forward secrecy).

After AUTH_OK every frame in both directions is sealed with its direction's key, the nonce being
the frame's 64-bit number in that direction (the low 32 bits are `seq`; keys are per direction,
so a nonce is never used twice), `check` is 0 and a 16-byte tag follows the payload:

- authenticated (the default): the tag is AES-GCM's GMAC over header + payload (nothing
  encrypted);
- encrypted (``MigrationOptions.encrypt``): the payload is AES-GCM ciphertext (compress, then
  encrypt), the header the associated data.

A frame whose tag does not match (a flipped bit, a frame forged or replayed by anyone without
the keys) is refused with a MigrationError naming it, logged, and counted in `frames_refused`.
docs/security.md says what this stops and why AES-GCM rather than TLS or BLAKE2b.

Data streams (``MigrationOptions.streams`` > 1): after CONFIG the source opens more connections
to the same listener, each carrying an equal share of each pass's pages (the destination
finishes a pass on every stream before it reads the next, so a page's frames stay in order). A data stream has no handshake of its own: its keys
come from the first stream's (HKDF as above, the info ending in ``/stream/<i>``), and its first
frame, JOIN with the index in `addr`, is sealed under them as frame 0; a connection that cannot
seal it holds no keys and is refused like any forged frame.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import logging
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import xxhash
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from msgspec import Struct

from pyhv.migration import frames

log = logging.getLogger("pyhv.migration")

#: 2: frames sealed after the handshake (1: xxh3 only, refused).
VERSION = 2
HEADER = struct.Struct("<BBHIIIQQ")
assert HEADER.size == 32
_HEAD_NO_CHECK = struct.Struct("<BBHIIIQ")
TAG = 16  #: bytes of the AES-GCM tag after each sealed frame's payload
MAX_FRAME = 8 << 20
MAX_UNAUTHENTICATED = 64 << 10
MAX_STREAMS = 16  #: connections of one migration (the first one and its data streams)
COMPRESSED = 0x01
_ZERO_RUN = struct.Struct("<QQ")
_NONCE = struct.Struct("<Q4x")  # a frame's 64-bit number in its direction, as a 96-bit nonce
_SPLIT_GMAC = 64 << 10  # payloads from this size on are not copied beside the header for GMAC


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
    JOIN = 16  # src -> dest, first on a data stream: Join {"stream"}; addr = the stream's index
    PREPARE = 17  # src -> dest: Empty; the pause comes next (the destination gets ready for it)
    PREPARED = 18  # dest -> src: Empty; ready: the source may pause
    # post-copy (pyhv.migration.postcopy); numbered apart from the pre-copy frames
    POSTCOPY = 30  # src -> dest: Postcopy {"migration"}; the state next, the rest after it runs
    NEED = 31  # src -> dest: (gpa, pages) runs the destination fetches (the rest it has or is 0)
    REQUEST = 32  # dest -> src: (gpa, pages) runs a VP or the host waits for: send them first
    POSTCOPY_DONE = 33  # dest -> src: PostcopyDone; every needed page is in, blocktime
    # recovery of a cut post-copy link (pyhv.migration.recovery)
    RESUME = 34  # src -> dest, first after a new handshake: Resume {"migration"}
    MISSING = 35  # dest -> src: (gpa, pages) runs the destination still lacks
    RESUME_ACK = 36  # dest -> src: ResumeAck {"pages", "runs"}; REQUESTs outstanding follow
    PREEMPT = 37  # src -> dest, first after a handshake: Resume {"migration"}; urgent channel


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


class Seal:
    """One direction's AES-256-GCM after the handshake: GMAC over header + payload
    (`encrypt` false) or the payload encrypted with the header as associated data. The nonce
    is the frame's number in this direction, counted here (never sent, never reused). Output
    goes into one buffer kept for the next frame (fresh memory per frame costs page faults)."""

    def __init__(self, key: bytes, encrypt: bool) -> None:
        if len(key) != 32:
            raise ValueError(f"a stream key is 32 bytes, not {len(key)}")
        self._aead = AESGCM(key)
        self._key = key
        self.encrypt = encrypt
        self.frames = 0
        self._buf = bytearray()
        self._signed = bytearray()  # header + payload, contiguous, for the GMAC
        self._in_place: memoryview | None = None  # the payload_buffer() handed out

    def payload_buffer(self, size: int) -> memoryview:
        """Room for the next payload right after the header's place in the GMAC's buffer: a
        payload built there is sealed without being copied again (once)."""
        end = HEADER.size + size
        if len(self._signed) < end:
            self._signed = bytearray(end)
        self._in_place = memoryview(self._signed)[HEADER.size : end]
        return self._in_place

    def scratch(self, size: int) -> memoryview:
        """`size` bytes of this direction's buffer (valid until the next frame)."""
        if len(self._buf) < size:
            self._buf = bytearray(size)
        return memoryview(self._buf)[:size]

    def _gmac(self, nonce: bytes, header: bytes, payload: bytes | bytearray | memoryview) -> bytes:
        """The tag of an authenticated frame: GMAC (AES-GCM, nothing to encrypt) over the
        header and the payload: in one call where the payload was built beside the header
        (payload_buffer), else as two pieces of associated data (the same tag; a received
        page frame is checked where it lies in guest RAM, not copied first: 30 against 56 us
        per 1 MiB frame here)."""
        end = len(header) + len(payload)
        in_place, self._in_place = payload is self._in_place, None
        if not in_place:
            if len(payload) < _SPLIT_GMAC:  # control frames: one call is cheaper
                return self._aead.encrypt(nonce, b"", header + bytes(payload))
            gcm = Cipher(algorithms.AES(self._key), modes.GCM(nonce)).encryptor()
            gcm.authenticate_additional_data(header)
            gcm.authenticate_additional_data(payload)
            gcm.finalize()
            return gcm.tag
        signed = memoryview(self._signed)
        signed[: len(header)] = header
        return self._aead.encrypt(nonce, b"", signed[:end])

    def _nonce(self) -> bytes:
        n = self.frames
        if n >= 1 << 64:  # 2^64 frames: never in practice, but a nonce must not repeat
            raise MigrationError("the stream sealed 2^64 frames under one key: reconnect")
        self.frames = n + 1
        return _NONCE.pack(n)

    def seal(self, header: bytes, payload: bytes | bytearray | memoryview) -> tuple[Any, bytes]:
        """(what goes on the wire as the payload, the tag)."""
        nonce = self._nonce()
        if self.encrypt:
            n = len(payload)
            out = self.scratch(n + TAG)
            self._aead.encrypt_into(nonce, payload, header, out)
            return out[:n], bytes(out[n:])
        return payload, self._gmac(nonce, header, payload)

    def open_into(self, header: bytes, wire: memoryview, view: memoryview) -> bool:
        """Check the frame and put its payload into `view`: `wire` is the payload as sent +
        the tag when encrypted (decrypted into `view`), the tag alone otherwise (the payload is
        in `view` already). False if forged (then `view` holds bytes to discard)."""
        nonce = self._nonce()
        if self.encrypt:
            try:
                self._aead.decrypt_into(nonce, wire, header, view)
            except InvalidTag:
                return False
            return True
        want = self._gmac(nonce, header, view)
        return hmac.compare_digest(want, wire)


class FrameSocket:
    """One side of the stream over a connected socket: send and receive framed, checksummed
    (handshake) or sealed (after it) frames.

    Sending counts bytes and honours a bandwidth limit (bytes/s; 0 = none). `fault` is the
    test-only injection hook (see pyhv.migration.faults): called with each frame type sent, it
    may corrupt or cut the stream. `frames_refused` counts frames refused as forged or
    corrupted (at most one: the stream ends there).
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
        self.bytes_sent = 0
        self.bytes_received = 0
        self.frames_sent = 0
        self.frames_refused = 0
        self._seq_out = 0
        self._seq_in = 0
        self._head = bytearray(HEADER.size)
        self._fault = fault
        self._lock = threading.Lock()
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._out: Seal | None = None
        self._in: Seal | None = None
        #: after the handshake: the data stream keys, (to destination, to source) of stream i
        self.stream_keys: Callable[[int], tuple[bytes, bytes]] | None = None
        self.index = 0  #: 0: the first stream; 1..: a data stream (join_destination)
        self.corrupt_next = False  # set by a fault plan: flip a payload bit of the next frame

    @property
    def authenticated(self) -> bool:
        """The handshake is done: frames are sealed both ways."""
        return self._out is not None and self._in is not None

    @property
    def encrypted(self) -> bool:
        return self._out is not None and self._out.encrypt

    def payload_buffer(self, size: int) -> memoryview:
        """A buffer of `size` bytes for the next frame's payload: fill it, then send() it, and
        it is sealed where it lies (one copy fewer than any other payload). Valid until the
        next send; for a stream with one sending thread (the source's)."""
        if self._out is None:
            return memoryview(bytearray(size))
        return self._out.payload_buffer(size)

    def seal(self, send_key: bytes, recv_key: bytes, encrypt: bool) -> None:
        """From the next frame on, seal what goes out with `send_key` and check what comes in
        with `recv_key` (each side's keys from :func:`derive_keys`, swapped)."""
        self._out = Seal(send_key, encrypt)
        self._in = Seal(recv_key, encrypt)
        # the nonce is the frame's number in its direction, counted from the stream's start
        self._out.frames, self._in.frames = self._seq_out, self._seq_in

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
            seq = self._seq_out
            if self._out is None:
                head = _HEAD_NO_CHECK.pack(ftype, flags, 0, seq, len(payload), count, addr)
                header = HEADER.pack(
                    ftype, flags, 0, seq, len(payload), count, addr, _check(head, payload)
                )
                tag = b""
            else:
                header = HEADER.pack(ftype, flags, 0, seq, len(payload), count, addr, 0)
                payload, tag = self._out.seal(header, payload)
            if self.corrupt_next and len(payload):
                self.corrupt_next = False
                bad = bytearray(payload)
                bad[len(bad) // 2] ^= 0x40
                payload = bad
            self._seq_out = (seq + 1) & 0xFFFFFFFF
            self._sendall(header, payload, tag)
            self.frames_sent += 1

    def send_json(self, ftype: Frame, obj: Struct | dict[str, Any]) -> None:
        """A control frame: its declared body (pyhv.migration.frames), or any JSON object."""
        if isinstance(obj, Struct):
            self.send(ftype, frames.encode(obj))
        else:
            self.send(ftype, json.dumps(obj, separators=(",", ":")).encode())

    def _sendall(
        self, header: bytes, payload: bytes | bytearray | memoryview, tag: bytes = b""
    ) -> None:
        n = len(header) + len(payload) + len(tag)
        parts = [memoryview(header), memoryview(payload).cast("B")]
        if tag:
            parts.append(memoryview(tag))
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
        """(type, flags, length, count, addr, check) of the next frame; its payload must be
        read next (:meth:`recv_payload_into`)."""
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
        """Read the payload into `view` (exactly its size) and verify the frame: its checksum
        during the handshake, its tag after it (a forged frame is refused, logged and
        counted; when not encrypted its bytes are in `view` by then: discard them)."""
        seq = (self._seq_in - 1) & 0xFFFFFFFF
        if self._in is None:
            self._recv_into(view)
            head = _HEAD_NO_CHECK.pack(ftype, flags, 0, seq, len(view), count, addr)
            if _check(head, view) != check:
                raise MigrationError(
                    f"{ftype.name} frame #{seq} ({len(view)} bytes at {addr:#x}) "
                    "failed its checksum: the stream was corrupted"
                )
            return
        header = bytes(self._head)
        if self._in.encrypt:
            wire = self._in.scratch(len(view) + TAG)
            self._recv_into(wire)
        else:
            self._recv_into(view)
            wire = self._in.scratch(TAG)
            self._recv_into(wire)
        if not self._in.open_into(header, wire, view):
            self.frames_refused += 1
            what = (
                f"{ftype.name} frame #{seq} ({len(view)} bytes at {addr:#x}) from the {self.peer}"
            )
            log.warning("refused a forged %s: its tag does not match", what)
            raise MigrationError(
                f"{what} failed authentication (its tag does not match): the stream was altered "
                "on the way or forged; refused"
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


class _Bytes:
    """A socket stand-in that serves fixed bytes (for :func:`decode_frame`)."""

    family = socket.AF_UNIX

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._data = memoryview(data).cast("B")
        self.at = 0

    def settimeout(self, _timeout: float) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self._data) - self.at)
        view[:n] = self._data[self.at : self.at + n]
        self.at += n
        return n


def decode_frame(
    data: bytes | bytearray | memoryview,
    *,
    seq: int = 0,
    recv_key: bytes | None = None,
    encrypt: bool = False,
) -> tuple[Frame, int, int, int, bytes]:
    """One whole frame from `data`, read and checked exactly as :meth:`FrameSocket.recv` reads
    it off the wire (for fuzzing and tools): (type, flags, count, addr, payload). `seq` is the
    frame's number in its direction; with `recv_key` the frame must be sealed under it (as
    frame number `seq`), without it it must carry a handshake checksum. Raises MigrationError
    (PeerAborted for ABORT), or ConnectionError if `data` is too short; bytes after the frame
    are refused."""
    src = _Bytes(data)
    fs = FrameSocket(src, peer="peer")  # type: ignore[arg-type]  # a stand-in socket
    fs._seq_in = seq & 0xFFFFFFFF
    if recv_key is not None:
        fs.seal(bytes(32), recv_key, encrypt)
        assert fs._in is not None
        fs._in.frames = seq
    frame = fs.recv()
    if src.at != len(src._data):
        raise MigrationError(f"{len(src._data) - src.at} bytes after the frame")
    return frame


def pack_zero_runs(runs: list[tuple[int, int]]) -> bytes:
    return b"".join(_ZERO_RUN.pack(g, n) for g, n in runs)


def unpack_zero_runs(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % _ZERO_RUN.size:
        raise MigrationError(f"ZERO frame of {len(payload)} bytes is not a list of 16-byte runs")
    return [r for r in _ZERO_RUN.iter_unpack(payload)]


# --- authentication -------------------------------------------------------------------------


def _mode(encrypt: bool) -> bytes:
    return b"encrypt" if encrypt else b"authenticate"


def _mac(token: bytes, role: bytes, *parts: bytes) -> str:
    return hmac.new(token, b"pyhv-migration/" + role + b"".join(parts), hashlib.sha256).hexdigest()


def _same_mac(want: str, given: object) -> bool:
    """Constant-time comparison with the peer's MAC, whatever JSON value it sent (compare_digest
    raises TypeError on str with non-ASCII characters: compare bytes)."""
    return hmac.compare_digest(want.encode(), str(given).encode())


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def derive_keys(
    token: bytes, shared: bytes, nonce_d: bytes, nonce_s: bytes, encrypt: bool, stream: int = 0
) -> tuple[bytes, bytes]:
    """(source -> destination key, destination -> source key): HKDF-SHA256 over the token and
    the X25519 shared secret, salted with both nonces, bound to the version, the mode and (for
    a data stream) the stream's index."""
    info = b"pyhv-migration/%d/" % VERSION + _mode(encrypt)
    if stream:
        info += b"/stream/%d" % stream
    okm = HKDF(algorithm=hashes.SHA256(), length=64, salt=nonce_d + nonce_s, info=info).derive(
        token + shared
    )
    return okm[:32], okm[32:]


def join_source(main: FrameSocket, sock: socket.socket, index: int) -> FrameSocket:
    """Make `sock`, a new connection to the destination, data stream `index` of the migration
    whose first stream is `main` (authenticated): sealed from its first frame, JOIN."""
    if main.stream_keys is None or main._out is None:
        raise MigrationError("a data stream needs an authenticated first stream", "streams")
    fs = FrameSocket(sock, bandwidth=main.bandwidth, timeout=main.sock.gettimeout() or 30.0,
                     peer=main.peer)  # fmt: skip
    to_dest, to_source = main.stream_keys(index)
    fs.seal(to_dest, to_source, main._out.encrypt)
    fs.send(Frame.JOIN, frames.encode(frames.Join(index)), addr=index)
    return fs


def join_destination(main: FrameSocket, sock: socket.socket, streams: int) -> FrameSocket:
    """A connection accepted for the migration of `main`: the data stream it claims to be
    (1 .. streams-1, in its JOIN's `addr`) if its JOIN is sealed under that stream's keys;
    MigrationError otherwise (a stranger, or a forged JOIN). Returns the stream, index in
    its `index` attribute."""
    if main.stream_keys is None or main._in is None:
        raise MigrationError("a data stream needs an authenticated first stream", "streams")
    fs = FrameSocket(sock, timeout=main.sock.gettimeout() or 30.0, peer=main.peer)
    ftype, flags, length, count, addr, check = fs.recv_header()
    if ftype is not Frame.JOIN or not 0 < addr < streams:
        fs.close(reset=True)
        raise MigrationError(
            f"a connection to the migration's listener sent {ftype.name} for stream {addr}, "
            f"not JOIN for one of streams 1..{streams - 1}: refused",
            "streams",
        )
    to_dest, to_source = main.stream_keys(addr)
    fs.seal(to_source, to_dest, main._in.encrypt)
    assert fs._in is not None and fs._out is not None
    fs._in.frames = fs._out.frames = 0  # sealed from its first frame, JOIN
    buf = bytearray(length)
    try:
        fs.recv_payload_into(memoryview(buf), ftype, flags, count, addr, check)
        join = frames.decode(bytes(buf), frames.Join, "JOIN")
    except (MigrationError, frames.FrameError) as e:
        fs.close(reset=True)
        raise MigrationError(f"data stream {addr} refused: {e}", "streams") from None
    if join.stream != addr:
        fs.close(reset=True)
        raise MigrationError(f"JOIN names stream {join.stream} in a frame for {addr}", "streams")
    fs.index = addr
    return fs


def _exchange(mine: X25519PrivateKey, theirs_hex: str) -> bytes:
    try:
        return mine.exchange(X25519PublicKey.from_public_bytes(bytes.fromhex(theirs_hex)))
    except ValueError as e:  # a low-order point (all-zero secret), or not a key at all
        raise MigrationError(f"the peer's X25519 key is unusable: {e}", "authenticate") from None


def authenticate_destination(fs: FrameSocket, token: bytes) -> None:
    """The destination's half of the challenge; raises MigrationError if the source fails it.
    On success the stream is sealed both ways, encrypted if the source asked."""
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
    mode = _mode(msg.encrypt)
    want = _mac(token, b"source/" + mode, nonce_d, nonce_s, bytes.fromhex(msg.key))
    if not _same_mac(want, msg.mac):
        fs.abort(failed)
        raise MigrationError(
            "authentication failed: the connecting source does not hold the migration token",
            "authenticate",
        )
    mine = X25519PrivateKey.generate()
    try:
        shared = _exchange(mine, msg.key)
    except MigrationError:
        fs.abort(failed)
        raise
    key_d = _public(mine)
    mac = _mac(token, b"destination/" + mode, nonce_s, nonce_d, bytes.fromhex(msg.key), key_d)
    fs.send_json(Frame.AUTH_OK, frames.AuthOk(mac, key_d.hex()))
    to_dest, to_source = derive_keys(token, shared, nonce_d, nonce_s, msg.encrypt)
    fs.seal(to_source, to_dest, msg.encrypt)
    fs.stream_keys = lambda i: derive_keys(token, shared, nonce_d, nonce_s, msg.encrypt, i)


def authenticate_source(fs: FrameSocket, token: bytes, encrypt: bool = False) -> None:
    """The source's half; raises MigrationError if the destination refuses or fails it. On
    success the stream is sealed both ways (and encrypted with `encrypt`)."""
    mine = X25519PrivateKey.generate()
    key_s = _public(mine)
    mode = _mode(encrypt)
    try:
        hello = fs.expect(Frame.HELLO, frames.Hello, "authenticate")
        if hello.version != VERSION:
            raise MigrationError(
                f"the destination speaks stream version {hello.version}, this host {VERSION}: "
                "run the same pyhv release on both hosts",
                "authenticate",
            )
        nonce_d = bytes.fromhex(hello.nonce)
        nonce_s = secrets.token_bytes(32)
        mac = _mac(token, b"source/" + mode, nonce_d, nonce_s, key_s)
        fs.send_json(Frame.AUTH, frames.Auth(VERSION, nonce_s.hex(), mac, key_s.hex(), encrypt))
        ok = fs.expect(Frame.AUTH_OK, frames.AuthOk, "authenticate")
    except PeerAborted as e:
        raise MigrationError(str(e), "authenticate") from None
    want = _mac(token, b"destination/" + mode, nonce_s, nonce_d, key_s, bytes.fromhex(ok.key))
    if not _same_mac(want, ok.mac):
        raise MigrationError(
            "the destination failed authentication: it does not hold the migration token",
            "authenticate",
        )
    shared = _exchange(mine, ok.key)
    to_dest, to_source = derive_keys(token, shared, nonce_d, nonce_s, encrypt)
    fs.seal(to_dest, to_source, encrypt)
    fs.stream_keys = lambda i: derive_keys(token, shared, nonce_d, nonce_s, encrypt, i)


def warm_up() -> None:
    """Pay the crypto library's first-use costs (OpenSSL's first X25519 key ~4 ms, the first
    GCM context of a page frame's tag ~1.3 ms here) before a handshake or a pass waits for
    them: the destination while it waits for a source, the source while it connects."""
    X25519PrivateKey.generate().public_key()
    AESGCM(bytes(32)).encrypt(bytes(12), b"", b"")
    gcm = Cipher(algorithms.AES(bytes(32)), modes.GCM(bytes(12))).encryptor()
    gcm.authenticate_additional_data(b"")
    gcm.finalize()


def token_bytes(token: str | bytes) -> bytes:
    raw = token.encode() if isinstance(token, str) else bytes(token)
    if len(raw) < 8:
        raise MigrationError(
            f"a migration token of {len(raw)} bytes is too short: use at least 8 (e.g. 32 random hex digits)"
        )
    return raw
