"""The bodies of the migration stream's control frames, declared once as msgspec Structs
(docs/messages.md): each control frame type (pyhv.migration.stream.Frame) carries one JSON
object of the Struct :data:`BODY` names for it. A body that does not decode (not JSON, a field
missing, unknown, of the wrong type or out of its bounds) is refused with a MigrationError that
names the frame and the field (pyhv.migration.stream.FrameSocket.expect). Page frames (PAGES, ZERO, EXTENTS) and the STATE frame are
binary and stay outside (speed; pyhv.migration.state declares the state's own layout)."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct, field

#: 32 random bytes, as hex.
Nonce = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
#: An X25519 public key (32 bytes), as hex.
Key = Annotated[str, Meta(pattern="^[0-9a-f]{64}$")]
#: A page-aligned guest physical address and a size in bytes: [gpa, size].
Region = tuple[Annotated[int, Meta(ge=0)], Annotated[int, Meta(gt=0, le=1 << 52)]]
_PAGE = 4096


class _Body(Struct, forbid_unknown_fields=True, frozen=True):
    pass


class Hello(_Body, frozen=True):
    """dest -> src, first: the stream version and the destination's nonce."""

    version: int
    nonce: Nonce


class Auth(_Body, frozen=True):
    """src -> dest: the source's nonce, its ephemeral X25519 key, whether it wants the stream
    encrypted, and its MAC over the mode, both nonces and its key. The MAC is any JSON value
    here: the destination compares it in constant time and refuses anything but the right one
    as a failed authentication. `key` has a default only so that an older source's AUTH (stream
    version 1) decodes far enough to be told its version is refused."""

    version: int
    nonce: Nonce
    mac: Any
    key: Key = "00" * 32
    encrypt: bool = False


class AuthOk(_Body, frozen=True):
    """dest -> src: the destination's MAC (over the mode, both nonces and both keys) and its
    ephemeral X25519 key. After this frame every frame is sealed (pyhv.migration.stream)."""

    mac: Any
    key: Key


class ConfigOptions(Struct, frozen=True):
    """What the source asks of the destination (unknown options from a newer source are
    ignored)."""

    verify: bool = True
    #: RESTORED, then wait for COMMIT before running the VM (off: the STATE frame commits)
    two_phase_commit: bool = False
    #: connections carrying pages: this one and streams-1 data streams (pyhv.migration.stream)
    streams: Annotated[int, Meta(ge=1, le=16)] = 1
    #: post-copy at once: the source pauses right after READY, so READY waits for the whole VM
    #: (otherwise it comes once the RAM exists and the VPs are built while pass 1 arrives)
    postcopy_at_once: bool = False
    #: post-copy: the destination sums RAM with pyhv.migration.postcopy.digest for
    #: POSTCOPY_DONE (the source's `verify`; an older source, which leaves it out, always
    #: compares it); off, POSTCOPY_DONE's checksum is ""
    postcopy_checksum: bool = True


class Config(_Body, frozen=True):
    """src -> dest: the VM's configuration (the worker's VmConfig dict, checked again by the
    destination's worker), its RAM layout, options and the Dynamic Memory layout."""

    config: dict[str, Any]
    regions: list[Region]
    options: ConfigOptions = field(default_factory=ConfigOptions)
    dynmem: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        for gpa, size in self.regions:
            if (gpa | size) % _PAGE:
                raise ValueError(f"RAM region [{gpa}, {size}] is not page-aligned")


class Join(_Body, frozen=True):
    """src -> dest, the first frame of a data stream: which one it is (also in the header)."""

    stream: Annotated[int, Meta(ge=1, le=15)]


class Empty(_Body, frozen=True):
    """READY, RESTORED: the frame itself is the message."""


#: Serial input a COMMIT may carry, at most (the UART's own backlog limit).
MAX_SERIAL_INPUT = 4096


class Commit(_Body, frozen=True):
    """src -> dest: run the VM; `serial_input`: what was typed at the source since its state
    was saved (the destination feeds it to the guest before its VPs run)."""

    serial_input: Annotated[bytes, Meta(max_length=MAX_SERIAL_INPUT)] = b""


class PassEnd(_Body, frozen=True, omit_defaults=True):
    """src -> dest: a memory pass ended."""

    pass_: Annotated[int, Meta(ge=0)] = field(name="pass")
    pages: Annotated[int, Meta(ge=0)] = 0
    last: bool = False  #: the final pass (a data stream ends with it)


class Checksum(_Body, frozen=True):
    """src -> dest: the checksum of all RAM at pause."""

    ram: Annotated[str, Meta(max_length=128)]


class Resumed(_Body, frozen=True):
    """dest -> src: the VPs run on the destination since `time` (its CLOCK_MONOTONIC), the
    start took `start_ms`."""

    time: float
    start_ms: float | None = None
    #: ms of the destination's steps of the downtime, by name (reported, not trusted)
    parts: Annotated[dict[Annotated[str, Meta(max_length=32)], float], Meta(max_length=16)] = {}


#: PostcopyDone's per-thread blocktimes: the threads named (VPs, then the host's) and a name's
#: length ("vp0", "tid 1234 (kworker/u8:2)": a kernel thread's comm is at most 15 characters).
MAX_BLOCKTIME_THREADS = 1024
MAX_THREAD_NAME = 64


class PostcopyDone(_Body, frozen=True):
    """dest -> src: every page the destination needed is in (the source may let its copy go):
    the checksum of RAM as it was at the pause (pyhv.migration.postcopy.digest; "" if not
    asked for), the faults
    served and the blocktime (how long faulting VPs and host threads waited), in ms."""

    #: "" when the source asked for none (CONFIG's `postcopy_checksum` off)
    checksum: Annotated[str, Meta(pattern="^([0-9a-f]{16})?$")]
    faults: Annotated[int, Meta(ge=0)]
    requested_pages: Annotated[int, Meta(ge=0)]
    blocktime_p50_ms: Annotated[float, Meta(ge=0)]
    blocktime_p99_ms: Annotated[float, Meta(ge=0)]
    blocktime_max_ms: Annotated[float, Meta(ge=0)]
    #: total wait per thread (a VP's or the host's), by its name: at most
    #: MAX_BLOCKTIME_THREADS of them, names of at most MAX_THREAD_NAME characters (a hostile
    #: destination could send any number of keys of any length to the source)
    thread_blocktime_ms: Annotated[
        dict[Annotated[str, Meta(max_length=MAX_THREAD_NAME)], Annotated[float, Meta(ge=0)]],
        Meta(max_length=MAX_BLOCKTIME_THREADS),
    ]
    #: times the source came back over a new connection after the link was cut
    recoveries: Annotated[int, Meta(ge=0)] = 0
    #: RESUME attempts refused (wrong token, unknown migration, a second source)
    resumes_refused: Annotated[int, Meta(ge=0)] = 0
    #: urgent channels attached (post-copy preempt: one per link)
    urgent_channels: Annotated[int, Meta(ge=0)] = 0


#: A migration's id (pyhv.migration.recovery): 16 random bytes, as hex.
MigrationId = Annotated[str, Meta(pattern="^[0-9a-f]{32}$")]


class Postcopy(_Body, frozen=True):
    """src -> dest: post-copy begins; `migration` names it, so that a source whose link was
    cut can resume it over a new connection (RESUME)."""

    migration: MigrationId


class Resume(_Body, frozen=True):
    """src -> dest, the first frame after a new handshake. RESUME: go on with the post-copy
    this id names (the link was cut); the destination answers MISSING runs and RESUME_ACK.
    PREEMPT: this connection is that post-copy's urgent channel (REQUESTs and their pages)."""

    migration: MigrationId


class ResumeAck(_Body, frozen=True):
    """dest -> src: the MISSING runs before it were all (`pages` in `runs` runs); the
    REQUESTs outstanding follow as ordinary REQUEST frames."""

    pages: Annotated[int, Meta(ge=0)]
    runs: Annotated[int, Meta(ge=0)]


class Abort(_Body, frozen=True):
    """Either way: the sender gives up, and why."""

    reason: Annotated[str, Meta(max_length=65536)] = "no reason given"


_encoder = msgspec.json.Encoder()


def encode(body: Struct) -> bytes:
    return _encoder.encode(body)


class FrameError(ValueError):
    """A control frame's body that does not decode; the text names the field."""


def decode(payload: bytes, kind: type[Any], frame: str) -> Any:
    """The body of a `frame` frame as `kind`, or FrameError naming the frame and the field."""
    try:
        return msgspec.json.decode(payload, type=kind)
    except (msgspec.DecodeError, ValueError) as e:
        why = str(e)
        if "$.regions" in why or "RAM region" in why:
            why += " (a RAM region is [gpa, size] with a page-aligned gpa >= 0 and size > 0)"
        raise FrameError(f"the {frame} frame is refused: {why}") from None
    except RecursionError:  # msgspec recurses per nesting level: "[[[[..." of a few KiB
        raise FrameError(f"the {frame} frame is refused: JSON nested too deeply") from None
