"""Fuzz targets of live migration, as the destination (and the source) receive them from an
untrusted peer: the frame decoder (FrameSocket: header, sequence, size limit, checksum) fed raw
bytes; well-framed streams whose payloads are the declared control bodies (pyhv.migration.frames),
ZERO/EXTENTS runs and the STATE frame; the handshake of both sides before authentication; and the
VM state (pyhv.migration.state) with the restore() checks of the components that run without
KVM (serial device, VMBus controller, DM VSP).

Frames are encoded with the stream module's own FrameSocket.send, so the targets follow its
header layout, checksum (handshake) and AES-GCM seal (after it: stream v2) as they change.
After the handshake both ends hold the same fixed key (:func:`frame_socket`), so fuzzed
payloads get past the tag to the decoders; raw bytes mostly do not, and are refused by it."""

from __future__ import annotations

import ctypes
import functools
import json
import mmap
import os
import socket
import struct
from array import array
from dataclasses import replace
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pyhv.devices.uart16550 import Uart16550
from pyhv.dynmem.vsp import DynamicMemoryVsp
from pyhv.hypervisor.exithandlers import KIND_COUNT
from pyhv.hypervisor.memory import MemoryRegion
from pyhv.hypervisor.state import COUNTER_NAMES, StateError
from pyhv.hypervisor.state import check as check_partition
from pyhv.hypervisor.vp import VpState
from pyhv.memory.manager import (
    MEMORY_STATE_VERSION,
    MemfdRegion,
    MemoryManager,
    MemoryManagerError,
    MemoryState,
)
from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.migration import frames
from pyhv.migration import stream as s
from pyhv.migration.destination import Incoming
from pyhv.migration.state import VmState
from pyhv.vmbus.controller import VmbusController
from pyhv.worker.config import ConfigError, VmConfig
from tests.support.fuzz import Reader, Target, blob
from tests.support.vm_state import vm_state

TOKEN = b"fuzz-migration-token"


class Wire:
    """A socket for FrameSocket: reads come from `data` (then EOF), writes are kept."""

    family = socket.AF_UNIX

    def __init__(self, data: bytes = b"") -> None:
        self.data = memoryview(data)
        self.at = 0
        self.sent = bytearray()

    def settimeout(self, t: float | None) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def recv_into(self, view: memoryview) -> int:
        n = min(len(view), len(self.data) - self.at)
        view[:n] = self.data[self.at : self.at + n]
        self.at += n
        return n

    def sendmsg(self, parts: list[memoryview]) -> int:
        for part in parts:
            self.sent += part
        return sum(len(part) for part in parts)

    def close(self) -> None:
        pass


#: What the handshake would derive (pyhv.migration.stream.derive_keys), fixed: one key for
#: both directions, so whichever end encodes a stream, the other end opens it.
KEY = bytes(range(32))
#: The stream's states: before the handshake (checksummed frames), after it (sealed:
#: authenticated or encrypted).
HANDSHAKE_MODE, AUTHENTICATED, ENCRYPTED = 0, 1, 2


def frame_socket(wire: Wire, mode: int) -> s.FrameSocket:
    """One end of a stream in the state `mode` (HANDSHAKE_MODE, AUTHENTICATED, ENCRYPTED). The
    one place that knows what the handshake leaves: both ends sealed under the same keys."""
    fs = s.FrameSocket(wire, timeout=1)  # type: ignore[arg-type]
    if mode != HANDSHAKE_MODE:
        fs.seal(KEY, KEY, encrypt=mode == ENCRYPTED)
    return fs


def encode_frames(records: list[tuple[int, int, int, int, bytes]], mode: int) -> bytes:
    """Frames (type, flags, count, addr, payload) as the stream module writes them."""
    wire = Wire()
    fs = frame_socket(wire, mode)
    for ftype, flags, count, addr, payload in records:
        fs.send(ftype, payload, count=count, addr=addr, flags=flags)  # type: ignore[arg-type]
    return bytes(wire.sent)


#: The declared body of each control frame (pyhv.migration.frames).
BODIES: dict[s.Frame, type[Any]] = {
    s.Frame.HELLO: frames.Hello,
    s.Frame.AUTH: frames.Auth,
    s.Frame.AUTH_OK: frames.AuthOk,
    s.Frame.CONFIG: frames.Config,
    s.Frame.READY: frames.Empty,
    s.Frame.PASS_END: frames.PassEnd,
    s.Frame.CHECKSUM: frames.Checksum,
    s.Frame.RESTORED: frames.Empty,
    s.Frame.COMMIT: frames.Empty,
    s.Frame.RESUMED: frames.Resumed,
    s.Frame.ABORT: frames.Abort,
    s.Frame.POSTCOPY: frames.Postcopy,
    s.Frame.POSTCOPY_DONE: frames.PostcopyDone,
    s.Frame.RESUME: frames.Resume,
    s.Frame.PREEMPT: frames.Resume,
    s.Frame.RESUME_ACK: frames.ResumeAck,
}
RECEIVED = (s.MigrationError, ConnectionError)


def _receive(fs: s.FrameSocket, limit: int = 32) -> None:
    """Frames as the destination's receiver takes them, each payload decoded as its type says."""
    for _ in range(limit):
        ftype, _flags, _count, _addr, payload = fs.recv()
        body = BODIES.get(ftype)
        if body is not None:
            try:
                msg = frames.decode(payload, body, ftype.name)
            except frames.FrameError:
                continue
            if isinstance(msg, frames.Config):
                try:  # what the destination's worker does with it
                    VmConfig.from_dict({**msg.config, "image": "/nonexistent/fuzz"})
                except (ConfigError, KeyError, TypeError, ValueError):
                    pass
        elif ftype in (
            s.Frame.ZERO,
            s.Frame.EXTENTS,
            s.Frame.MISSING,
            s.Frame.NEED,
            s.Frame.REQUEST,
        ):
            for gpa, n in s.unpack_zero_runs(payload):
                assert 0 <= gpa < 1 << 64 and 0 <= n < 1 << 64
        elif ftype is s.Frame.STATE:
            VmState.decode(payload)


def raw_stream(data: bytes) -> None:
    """Bytes as they come off the socket, before and after the handshake (the length picks the
    mode: every mode, whatever the input): as a stream, then as one frame (decode_frame)."""
    mode = len(data) % 3
    try:
        _receive(frame_socket(Wire(data), mode))
    except RECEIVED:
        pass
    s.decode_frame(
        data, recv_key=KEY if mode != HANDSHAKE_MODE else None, encrypt=mode == ENCRYPTED
    )


def _records(data: bytes) -> list[tuple[int, int, int, int, bytes]]:
    r = Reader(data)
    out: list[tuple[int, int, int, int, bytes]] = []
    while r.left and len(out) < 32:
        # types 0..16: the known ones and one past each end (migration.frame_decoder sends any)
        out.append((r.u8() % 17, r.u8(), r.u32(), r.u64(), r.blob()))
    return out


def _record(ftype: int, payload: bytes, count: int = 0, addr: int = 0, flags: int = 0) -> bytes:
    return struct.pack("<BBIQ", ftype, flags, count, addr) + blob(payload)


def framed_stream(data: bytes) -> None:
    """Well-framed streams (right sequence and seal) whose payloads are the fuzzed part
    (authenticated or encrypted, as the length says)."""
    mode = ENCRYPTED if len(data) % 2 else AUTHENTICATED
    _receive(frame_socket(Wire(encode_frames(_records(data), mode)), mode))


def handshake(data: bytes) -> None:
    """Both sides' halves of the handshake against what the fuzzed peer sends."""
    raw = encode_frames(_records(data), HANDSHAKE_MODE)
    for side in (s.authenticate_destination, s.authenticate_source):
        try:
            side(frame_socket(Wire(raw), HANDSHAKE_MODE), TOKEN)
        except RECEIVED:
            continue  # each side refuses; the next one is tried on the same bytes
        raise AssertionError(f"{side.__name__} authenticated a peer without the token")


def _nonce() -> str:
    return "ab" * 32


def _key() -> str:
    """A valid X25519 public key (of a fixed private key), as the handshake carries one."""
    private = X25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
    return private.public_key().public_bytes_raw().hex()


def _handshake_records() -> tuple[bytes, bytes, bytes, bytes]:
    """HELLO, AUTH (authenticate), AUTH (encrypt), AUTH_OK with their declared bodies."""
    return (
        _record(s.Frame.HELLO, frames.encode(frames.Hello(s.VERSION, _nonce()))),
        _record(s.Frame.AUTH, frames.encode(frames.Auth(s.VERSION, _nonce(), "00" * 32, _key()))),
        _record(
            s.Frame.AUTH,
            frames.encode(frames.Auth(s.VERSION, _nonce(), "00" * 32, _key(), encrypt=True)),
        ),
        _record(s.Frame.AUTH_OK, frames.encode(frames.AuthOk("00" * 32, _key()))),
    )


def stream_seeds() -> list[bytes]:
    """Streams as a source sends them: every frame type with a valid body."""
    state = vm_state().encode()
    config = frames.Config(
        {"name": "vm", "memory": 64 << 20, "vps": 1, "image": "x", "dynamic_memory": False},
        [(0, 64 << 20)],
    )
    runs = s.pack_zero_runs([(0x1000, 4), (1 << 20, 256)])
    hello, auth, _auth_encrypt, ok = _handshake_records()
    one = [
        hello,
        auth,
        ok,
        _record(s.Frame.CONFIG, frames.encode(config)),
        _record(s.Frame.READY, frames.encode(frames.Empty())),
        _record(s.Frame.PAGES, bytes(4096), count=1, addr=0x1000),
        _record(s.Frame.ZERO, runs),
        _record(s.Frame.EXTENTS, runs),
        _record(s.Frame.PASS_END, frames.encode(frames.PassEnd(1, 3))),
        _record(s.Frame.STATE, state),
        _record(s.Frame.CHECKSUM, frames.encode(frames.Checksum("ff" * 8))),
        _record(s.Frame.RESTORED, frames.encode(frames.Empty())),
        _record(s.Frame.COMMIT, frames.encode(frames.Empty())),
        _record(s.Frame.RESUMED, frames.encode(frames.Resumed(12.5, 3.0))),
        _record(s.Frame.ABORT, frames.encode(frames.Abort("the source gives up"))),
    ]
    return [b"".join(one[:4]), b"".join(one[4:9]), b"".join(one[9:]), *one]


def raw_seeds() -> list[bytes]:
    """Streams and single frames in every mode, padded so that their length picks it."""
    out = []
    progs = stream_seeds()
    # a stream, and one frame (decode_frame): HELLO, PAGES, ZERO
    for mode, single in ((HANDSHAKE_MODE, 3), (AUTHENTICATED, 8), (ENCRYPTED, 9)):
        for prog in (progs[mode], progs[single]):
            raw = encode_frames(_records(prog), mode)
            out.append(raw + b"\0" * ((mode - len(raw)) % 3))
    return out


def handshake_seeds() -> list[bytes]:
    hello, auth, auth_encrypt, ok = _handshake_records()
    abort = _record(s.Frame.ABORT, frames.encode(frames.Abort("no")))
    return [auth, auth_encrypt, hello + ok, hello, auth + ok, abort]


RAW_STREAM = Target(
    "migration.frame_decoder",
    "migration frame decoder on raw bytes (pyhv.migration.stream.FrameSocket)",
    raw_seeds,
    raw_stream,
    RECEIVED,
    max_size=16384,
)
FRAMED_STREAM = Target(
    "migration.frames",
    "migration frames' payloads: control bodies, zero runs, state (pyhv.migration.frames)",
    stream_seeds,
    framed_stream,
    RECEIVED,
    max_size=16384,
)
HANDSHAKE = Target(
    "migration.handshake",
    "migration handshake before authentication, both sides (pyhv.migration.stream)",
    handshake_seeds,
    handshake,
    RECEIVED,
    max_size=16384,
)


# --- the destination's receiver: pages into guest RAM ------------------------------------------

RAM_PAGES = 256


class _Ram:
    """One region of guest RAM at GPA 0 (a memfd, as a partition's), made once per process."""

    def __init__(self) -> None:
        fd = os.memfd_create("pyhv-fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(fd, RAM_PAGES * 4096)
        mm = mmap.mmap(fd, RAM_PAGES * 4096)
        self._anchor = ctypes.c_char.from_buffer(mm)  # keeps the mapping where it is
        self.region = MemoryRegion(0, RAM_PAGES * 4096, False, False, 0, fd, 0,
                                   ctypes.addressof(self._anchor), mm)  # fmt: skip
        self.gpa_space = self
        self.partition = self

    def find(self, gpa: int) -> MemoryRegion | None:
        return self.region if 0 <= gpa < self.region.end else None


@functools.cache
def _ram() -> _Ram:
    return _Ram()


def receive_memory(data: bytes) -> None:
    """The destination's memory passes (Incoming._memory) on well-framed frames: PAGES (raw
    and zstd) straight into guest RAM, ZERO runs punched out, EXTENTS backed ahead, PASS_END,
    up to the STATE frame, decoded."""
    ram = _ram()
    # A real Incoming (every attribute its receive loops use), its listener never used.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unused:
        inc = Incoming(unused, b"fuzz-migration-token")
    mode = ENCRYPTED if len(data) % 2 else AUTHENTICATED
    inc.fs = frame_socket(Wire(encode_frames(_records(data), mode)), mode)
    written = {0: np.zeros(RAM_PAGES, dtype=bool)}
    try:
        inc._memory(ram, written)  # type: ignore[arg-type]
    finally:
        inc._populater.stop()
    assert inc.pages >= 0


def receiver_seeds() -> list[bytes]:
    import zstandard

    page = bytes(range(256)) * 16
    packed = zstandard.ZstdCompressor(level=1).compress(page * 2)
    runs = s.pack_zero_runs([(0x3000, 2), (0x8000, 16)])
    state = _record(s.Frame.STATE, vm_state().encode())
    return [
        _record(s.Frame.PAGES, page, count=1, addr=0x1000)
        + _record(s.Frame.PAGES, packed, count=2, addr=0x2000, flags=s.COMPRESSED)
        + _record(s.Frame.ZERO, runs)
        + _record(s.Frame.PASS_END, frames.encode(frames.PassEnd(1, 3)))
        + state,
        _record(s.Frame.EXTENTS, runs) + _record(s.Frame.PAGES, page * 2, count=2, addr=0x8000)
        + _record(s.Frame.ZERO, runs) + state,
        _record(s.Frame.PAGES, page, count=1, addr=0xFF000) + _record(s.Frame.ABORT, b"no"),
    ]  # fmt: skip


RECEIVER = Target(
    "migration.receiver",
    "the destination's memory passes: page frames into guest RAM (pyhv.migration.destination)",
    receiver_seeds,
    receive_memory,
    RECEIVED,
    max_size=16384,
)


# --- the VM state and the components' restore() checks -------------------------------------


RAM = 1 << 20


class _Vp:
    """What the partition state's check() reads of a VP: its run state and counters."""

    def __init__(self) -> None:
        self.state = VpState.IDLE
        for name in COUNTER_NAMES:
            setattr(self, name, array("q", bytes(8 * KIND_COUNT)))


class _Partition:
    """What check() reads of a partition (no KVM): RAM regions, VPs, the IRQCHIP flag; the
    one the seed state was saved from."""

    name = "vm"
    irqchip = True

    def __init__(self) -> None:
        self.regions = [MemoryRegion(0, 1 << 20, False, True, 0, -1, 0, 0, None)]  # type: ignore[arg-type]
        self.vps = {0: _Vp()}


def restore_state(data: bytes) -> None:
    st = VmState.decode(data)
    try:
        check_partition(_Partition(), st.partition)  # type: ignore[arg-type]
    except StateError:
        pass
    try:
        Uart16550(lambda b: None).restore(st.uart)
    except ValueError:
        pass
    if st.dynmem is None:
        return
    view = memoryview(bytearray(RAM))

    def memory(gpa: int, size: int) -> memoryview:
        if gpa < 0 or size < 0 or gpa + size > RAM:
            raise ValueError(f"{gpa:#x}+{size:#x} is not RAM")
        return view[gpa : gpa + size]

    ctl = VmbusController(memory, lambda v: lambda: None)
    ctl.offer("525074DC-8985-46e2-8057-A307DC18A502", lambda ch: None)
    try:
        ctl.restore(st.dynmem.channel)
    except ValueError:
        pass
    vsp = DynamicMemoryVsp(RangeSet([(0, 256)]))
    try:
        vsp.restore(st.dynmem.vsp)
    except ValueError:
        return
    saved, given = vsp.save(), st.dynmem.vsp
    assert (saved.state, saved.protocol, saved.caps, saved.trans_id) == (
        given.state,
        given.protocol,
        given.caps,
        given.trans_id,
    ), "restored differently"
    assert sum(r.count for r in saved.ballooned) == sum(r.count for r in given.ballooned)


def state_seeds() -> list[bytes]:
    st = vm_state()
    return [st.encode(), replace(st, dynmem=None).encode()]


STATE = Target(
    "migration.state",
    "migration VM state and its components' restore() checks (pyhv.migration.state)",
    state_seeds,
    restore_state,
    (s.MigrationError,),
    max_size=16384,
    json=True,
)

# --- the Dynamic Memory layout a source sends in CONFIG --------------------------------------

MIB = 1 << 20


def restore_layout(data: bytes) -> None:
    """The layout as the destination's memory manager takes it (pyhv.migration.dynmem.prepare):
    hot-added regions mapped from its pool, the balloon released; refused whole or taken whole."""
    try:
        wire = json.loads(data)
    except (ValueError, RecursionError):
        return  # the CONFIG frame's body decoder refuses it first (migration.frames)
    st = MemoryState.from_wire(wire)
    made: list[MemfdRegion] = []

    def map_region(gpa: int, size: int) -> MemfdRegion:
        made.append(MemfdRegion(gpa, size))  # sparse: the pool's budget bounds the size
        return made[-1]

    startup = MemfdRegion(0, 16 * MIB)
    try:
        mm = MemoryManager(64 * MIB)
        mm.add_partition("vm", [startup], map_region, lambda r: None)
        try:
            mm.restore("vm", st)
        except MemoryManagerError:
            assert mm.save("vm").hot_added == (), "a refused layout changed the partition"
            return
        saved = mm.save("vm")
        assert saved.hot_added == tuple(map(tuple, st.hot_added))
        assert sum(r.count for r in saved.ballooned) == sum(r.count for r in st.ballooned)
        assert mm.free_pages >= 0
    finally:
        for r in [startup, *made]:
            r.close()


def layout_seeds() -> list[bytes]:
    st = MemoryState(
        MEMORY_STATE_VERSION,
        ((0, 16 * MIB),),
        ((64 * MIB, 8 * MIB), (128 * MIB, 4 * MIB)),
        (PageRange(16, 4), PageRange(0x4000, 512)),
    )
    return [
        json.dumps(st.to_wire()).encode(),
        json.dumps(replace(st, hot_added=()).to_wire()).encode(),
    ]


LAYOUT = Target(
    "migration.memory_layout",
    "the Dynamic Memory layout a source sends, as the memory manager restores it (pyhv.memory)",
    layout_seeds,
    restore_layout,
    (MemoryManagerError,),
    json=True,
)

TARGETS = [RAW_STREAM, FRAMED_STREAM, HANDSHAKE, RECEIVER, STATE, LAYOUT]
