"""Every message between a worker process and its owner (the VMMS, ``pyhv run --process``,
``pyhv migrate``), declared once as a msgspec Struct: the wire form, the validation and the
dispatch all come from these declarations (docs/messages.md says why msgspec).

Owner -> worker messages are tagged by ``"op"`` (:data:`Op`), worker -> owner messages by
``"ev"`` (:data:`Event`); each frame of pyhv.worker.protocol carries one, as JSON. The
operator's control socket of a VM (pyhv.worker.control) has its own two:
:data:`ControlRequest` and :class:`ControlReply`. A message that
does not decode against its union (unknown tag, missing or unknown field, wrong type, a bool
for a number, a value out of its bounds) is refused with :class:`MessageError`, which names
the field; the receiver logs it, counts it and goes on.

The first message of the owner (:class:`Boot` or :class:`Incoming`) and the worker's
:class:`Started` carry :data:`PROTOCOL_VERSION`; a peer that speaks another version is refused.

To add a message: declare a Struct with ``tag=`` here, add it to :data:`Op` or :data:`Event`,
and give the receiver a handler for its type (the receivers dispatch with a dict from type to
handler, and refuse a type they have no handler for).

msgspec costs ~8 ms to import here, so this module is imported only where messages cross
(the worker's serve(), WorkerProcess), never on the in-process `pyhv run` boot path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field

from pyhv.dynmem.status import MemoryStatus, StatusError
from pyhv.worker.outcome import REASONS, VmEnd

#: The version of this protocol; bump it when a message changes incompatibly.
PROTOCOL_VERSION = 2

#: A request id chosen by the owner (the worker echoes it in the reply).
RequestId = Annotated[int, Meta(ge=0, le=(1 << 63) - 1)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Seconds = Annotated[float, Meta(gt=0.0, le=86400.0 * 365)]
#: Short text: a reason, a phase, an error (a hostile peer cannot make the receiver log MBs).
Text = Annotated[str, Meta(max_length=65536)]
#: The secret an owner proves itself with to adopt a worker (pyhv.worker.adoption).
AdoptionSecret = Annotated[str, Meta(min_length=32, max_length=256)]


class MessageError(ValueError):
    """A message that does not decode; the text names the field and what was expected."""


class _Op(Struct, tag_field="op", forbid_unknown_fields=True, frozen=True):
    """An owner -> worker message."""


class _Event(Struct, tag_field="ev", forbid_unknown_fields=True, frozen=True):
    """A worker -> owner message."""


# --- owner -> worker ----------------------------------------------------------------------


class SmartPagingFd(Struct, forbid_unknown_fields=True, frozen=True):
    """The Smart Paging file a worker inherits: its fd number and the bytes it backs."""

    fd: Annotated[int, Meta(ge=3, le=1 << 20)]
    size: Annotated[int, Meta(gt=0, le=1 << 50)]


class Boot(_Op, tag="boot", frozen=True):
    """First message: build and start the VM of `config` (pyhv.worker.config.VmConfig's dict,
    which the worker validates again: it is untrusted input to the worker too)."""

    config: dict[str, Any]
    #: PROTOCOL_VERSION (pass it: absent means version 1, which had no such field).
    protocol: int = 1
    #: Smart Paging (pyhv.worker.smartpaging): the file's fd, inherited from the owner, and
    #: the bytes at the top of RAM it backs; None when the host gave all the startup RAM.
    smart_paging: SmartPagingFd | None = None
    #: The secret a new owner must say in its :class:`Hello` (pyhv.worker.adoption); with it
    #: the worker keeps its VM running when its owner goes away and takes a new one on the
    #: listening socket it was given. None: it stops its VM on EOF, as before.
    adoption_secret: AdoptionSecret | None = None


class Incoming(_Op, tag="incoming", frozen=True):
    """First message of a live migration's destination (pyhv.migration.worker): listen, take
    one VM, then run it like any worker."""

    token: Annotated[str, Meta(min_length=1, max_length=4096)]
    protocol: int = 1
    listen: tuple[Text, Port] = ("127.0.0.1", 0)
    max_memory: Annotated[int, Meta(ge=0)] | None = None
    timeout: Seconds = 30.0
    accept_timeout: Seconds = 300.0
    faults: dict[Text, Text] = field(default_factory=dict)
    #: The image the VM boots here, as the owner resolved it; the source's path is ignored.
    image: Text | None = None
    #: The page file's host file here, as the owner chose it (None: one of the worker's own);
    #: the source's path is ignored (it names a file of the source's host).
    page_file: Text | None = None
    #: An fd of /dev/userfaultfd the owner opened and passed (post-copy from a jailed worker,
    #: which may not call userfaultfd(2) for kernel faults itself); None: the syscall.
    userfaultfd: Annotated[int, Meta(ge=0)] | None = None
    #: As Boot's (the VM keeps running without its owner once it resumed here).
    adoption_secret: AdoptionSecret | None = None
    #: Resume only after the owner said :class:`Resume` (answering :class:`Committed`): the
    #: owner records the VM as its own first. Its EOF before that aborts (no RESUMED).
    confirm: bool = False
    #: Post-copy: seconds to wait for the source to reconnect after the link was cut once
    #: the VM runs here (pyhv.migration.recovery); then the VM is stopped.
    recover_timeout: Seconds = 60.0


class SerialIn(_Op, tag="serial", frozen=True):
    """Bytes typed into the VM's serial port (base64 on the wire)."""

    data: bytes


class Stop(_Op, tag="stop", frozen=True):
    """Stop the VM; its end report says `why`."""

    why: Text = "stopped by its owner"


MemoryCallName = Literal[
    "status", "target", "limits", "add", "remove", "end_smart_paging", "hot_remove"
]


class MemoryCall(_Op, tag="memory", frozen=True):
    """A Dynamic Memory request: ``status``; ``target`` (bytes); ``limits`` ([minimum, maximum]
    bytes); ``add`` / ``remove`` (pages); ``end_smart_paging`` (no value); ``hot_remove`` (pages, or
    none: every hot-added page). Answered by :class:`MemoryReply` with the same id."""

    id: RequestId
    call: MemoryCallName
    #: Checked by the VM's call itself, whose error (in the reply) names the bound.
    value: int | tuple[int, int] | None = None


class Migrate(_Op, tag="migrate", frozen=True):
    """Start an outgoing live migration to host:port (answered by :class:`MigrationProgress`
    reports, then :class:`MigrationDone` or :class:`MigrationFailed` with the same id)."""

    id: RequestId
    host: Text
    port: Port
    token: Annotated[str, Meta(min_length=1, max_length=4096)]
    options: dict[str, Any] = field(default_factory=dict)


class MigrationDecision(_Op, tag="migration_decision", frozen=True):
    """The owner's decision on a migration in doubt: ``stop`` (the VM runs at the destination)
    or ``resume`` (it does not)."""

    id: RequestId
    decision: Literal["stop", "resume"]


class Trace(_Op, tag="trace", frozen=True):
    """Stream the VM's flight-recorder events of `kinds` (None: all) with only those sources
    on, or stop (pyhv.trace, pyhv.worker.trace)."""

    on: bool
    kinds: list[Annotated[str, Meta(max_length=32)]] | None = None


class Hello(_Op, tag="hello", frozen=True):
    """First message of a new owner on the worker's adoption socket (pyhv.worker.adoption):
    the protocol version and the secret the worker was started with. Answered by
    :class:`Adopted`, or :class:`Refused` and the connection closed."""

    protocol: int
    secret: AdoptionSecret


class Resume(_Op, tag="resume", frozen=True):
    """The answer to :class:`Committed`: the owner has recorded the arrived VM as its own
    (durably); the destination worker may resume it and tell the source."""


Op = (
    Boot
    | Incoming
    | SerialIn
    | Stop
    | MemoryCall
    | Migrate
    | MigrationDecision
    | Trace
    | Hello
    | Resume
)


# --- worker -> owner ----------------------------------------------------------------------


class Started(_Event, tag="started", frozen=True):
    """The VM runs (its VPs are started)."""

    pid: Annotated[int, Meta(ge=0)]
    protocol: int = 1


class SerialOut(_Event, tag="serial", frozen=True):
    """Output of the VM's serial port (base64 on the wire)."""

    data: bytes


class EndReport(Struct, forbid_unknown_fields=True, frozen=True):
    """How the VM ended (pyhv.worker.outcome.VmEnd's wire form)."""

    reason: str
    status: int | None = None
    vp: Annotated[int, Meta(ge=0, lt=1024)] | None = None
    registers: dict[Text, Annotated[int, Meta(ge=0)]] = field(default_factory=dict)
    detail: Annotated[str, Meta(max_length=65536)] = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown VM end reason {self.reason!r}: expected one of {REASONS}")

    @classmethod
    def of(cls, end: VmEnd) -> EndReport:
        return cls(end.reason, end.status, end.vp, dict(end.registers), end.detail)

    def to_end(self) -> VmEnd:
        return VmEnd(self.reason, self.status, self.vp, dict(self.registers), self.detail)


class Ended(_Event, tag="ended", frozen=True):
    """The VM ended (the worker's last message; it exits after)."""

    end: EndReport


class MemoryReply(_Event, tag="memory", frozen=True):
    """The answer to :class:`MemoryCall` `id`: its result, or the reason it was refused."""

    id: RequestId
    result: Any = None
    error: Text | None = None


class MemoryStatusPushed(_Event, tag="memory_status", frozen=True):
    """The VM's memory status, pushed at every guest report and every goal reached."""

    status: MemoryStatus


class MigrationProgress(_Event, tag="migration_progress", frozen=True):
    """A progress report of migration `id` (pyhv.migration.source's progress dict)."""

    id: RequestId
    progress: dict[str, Any]


class MigrationDone(_Event, tag="migration_done", frozen=True):
    """Migration `id` succeeded (the VM then stops here: "migrated to host:port")."""

    id: RequestId
    result: dict[str, Any]


class MigrationFailed(_Event, tag="migration_failed", frozen=True):
    """Migration `id` failed in `phase` (the VM runs on), or, with `in_doubt`, lost its
    connection after COMMIT (the VM is paused until a :class:`MigrationDecision`)."""

    id: RequestId
    error: Text
    phase: Text = ""
    in_doubt: bool = False


class Listening(_Event, tag="listening", frozen=True):
    """A destination worker listens for the source at host:port."""

    host: Text
    port: Port


class MigratedIn(_Event, tag="migrated_in", frozen=True):
    """A destination worker took the VM (its configuration) from `source`."""

    config: dict[str, Any]
    source: Text
    passes: Annotated[int, Meta(ge=0)]
    pages: Annotated[int, Meta(ge=0)]


class Committed(_Event, tag="committed", frozen=True):
    """A destination worker (``Incoming`` with ``confirm``) is about to hold the whole VM: the
    source asked it to get ready for its pause (PREPARE; with post-copy, once the VM is restored
    and the source has sent COMMIT). The owner records it as its own, then answers
    :class:`Resume`, which lets the worker run the VM once it is committed (or stops it, or goes
    away: before the commit the worker then aborts and never resumes)."""

    config: dict[str, Any]


class Adopted(_Event, tag="adopted", frozen=True):
    """A worker's answer to a new owner's :class:`Hello`: what it is. Then it streams to that
    owner as to the one that started it (an ended VM's worker exits after this)."""

    protocol: int
    #: The worker's own pid (1 in a jail's pid namespace: the owner knows its host pid).
    pid: Annotated[int, Meta(ge=0)]
    config: dict[str, Any]
    #: "running", "paused" (a migration in doubt waits for its decision) or "ended" (`end`).
    state: Literal["running", "paused", "ended"]
    end: EndReport | None = None
    #: The memory status it last pushed (None: no Dynamic Memory, or no report yet).
    memory: MemoryStatus | None = None
    #: The newest serial output (a bounded ring kept whatever the owner), base64 on the wire.
    serial: Annotated[bytes, Meta(max_length=65536)] = b""
    #: An outgoing migration in flight (its id, as the previous owner's Migrate gave it).
    migration: RequestId | None = None
    #: How it fared without an owner: owners it had, serial bytes it dropped, messages refused.
    counters: dict[Annotated[str, Meta(max_length=64)], Annotated[int, Meta(ge=0)]] = field(
        default_factory=dict
    )


class TraceEvents(_Event, tag="trace", frozen=True):
    """A batch of the VM's recorded events, each in the wire form of pyhv.trace.events (checked
    one by one by the owner: a bad batch is refused and counted)."""

    events: list[dict[str, Any]]


class Refused(_Event, tag="refused", frozen=True):
    """The worker refused a message of its owner (it did not decode): why."""

    why: Text


Event = (
    Started
    | SerialOut
    | Ended
    | MemoryReply
    | MemoryStatusPushed
    | MigrationProgress
    | MigrationDone
    | MigrationFailed
    | Listening
    | MigratedIn
    | TraceEvents
    | Refused
    | Committed
    | Adopted
)

# --- the operator's control socket (pyhv.worker.control, `pyhv memory --control`) ----------


class _Control(Struct, tag_field="op", forbid_unknown_fields=True, frozen=True):
    """An operator's request on a VM's control socket."""


class ControlStatus(_Control, tag="status", frozen=True):
    """The VM's memory status (the operator's view)."""


class ControlTarget(_Control, tag="target", frozen=True):
    """Balloon, unballoon or hot-add towards `bytes`."""

    bytes: Annotated[int, Meta(ge=0)]


class ControlHotRemove(_Control, tag="hot_remove", frozen=True):
    """Take `bytes` back from the guest offline (DM hot-remove); none: all hot-added memory."""

    bytes: Annotated[int, Meta(ge=0)] | None = None


ControlRequest = ControlStatus | ControlTarget | ControlHotRemove


class ControlReply(Struct, frozen=True, omit_defaults=True):
    """The answer: ``ok`` with the status (and the plan of a target), or the error."""

    ok: bool
    status: Any = None
    plan: Any = None
    error: Text | None = None


# --- encoding and decoding ----------------------------------------------------------------

_encoder = msgspec.json.Encoder()
_op_decoder = msgspec.json.Decoder(Op)
_event_decoder = msgspec.json.Decoder(Event)
_control_decoder = msgspec.json.Decoder(ControlRequest)
_reply_decoder = msgspec.json.Decoder(ControlReply)


def encode(message: Struct) -> bytes:
    return _encoder.encode(message)


def _tags(union: Any) -> str:
    return ", ".join(repr(t.__struct_config__.tag) for t in union.__args__)


def _decode(decoder: msgspec.json.Decoder[Any], raw: bytes, what: str) -> Any:
    try:
        message = decoder.decode(raw)
    except msgspec.DecodeError as e:  # ValidationError is one
        why = str(e)
        if why.endswith(("at `$.op`", "at `$.ev`")):
            why += f" (known: {_tags(decoder.type)})"
        raise MessageError(f"{what} refused: {why}") from None
    except (ValueError, TypeError) as e:  # a __post_init__ check
        raise MessageError(f"{what} refused: {e}") from None
    except RecursionError:  # msgspec recurses per nesting level: "[[[[..." of a few KiB
        raise MessageError(f"{what} refused: JSON nested too deeply") from None
    status = None
    if isinstance(message, MemoryStatusPushed):
        status = message.status
    elif isinstance(message, Adopted):
        status = message.memory
    if status is not None:
        try:
            status.check()
        except StatusError as e:
            raise MessageError(f"{what} refused: {e}") from None
    return message


def decode_op(raw: bytes) -> Op:
    """An owner's message (in the worker); MessageError says why it is not one."""
    return _decode(_op_decoder, raw, "message from the owner")  # type: ignore[no-any-return]


def decode_event(raw: bytes) -> Event:
    """A worker's message (in the owner); MessageError says why it is not one."""
    return _decode(_event_decoder, raw, "message from the worker")  # type: ignore[no-any-return]


def decode_control(raw: bytes) -> ControlRequest:
    """An operator's request (in the VM); MessageError says why it is not one."""
    return _decode(_control_decoder, raw, "control request")  # type: ignore[no-any-return]


def decode_control_reply(raw: bytes) -> ControlReply:
    """The VM's answer (in `pyhv memory`); MessageError says why it is not one."""
    return _decode(_reply_decoder, raw, "control reply")  # type: ignore[no-any-return]


def check_version(version: int, who: str) -> None:
    """Refuse a peer that speaks another protocol version."""
    if version != PROTOCOL_VERSION:
        raise MessageError(
            f"{who} speaks worker protocol version {version}, this pyhv speaks "
            f"{PROTOCOL_VERSION}: run the same pyhv on both sides (restart the VM)"
        )
