"""Fuzz targets of the worker <-> owner boundary (pyhv.worker.messages, pyhv.worker.protocol):
the owner's messages as the worker decodes and takes them (a Boot's configuration checked again),
the worker's messages as the owner decodes and takes them (the flight recorder's events shown
as `pyhv vm trace` shows them, the end report), the operator's control socket as a running VM
answers it (pyhv.worker.control), and the length-prefixed framing itself."""

from __future__ import annotations

import struct
from typing import Any

from pyhv.dynmem.status import MemoryStatus
from pyhv.trace.events import DmEvent, IoEvent, TraceError, event_from_wire
from pyhv.worker import messages as m
from pyhv.worker import protocol
from pyhv.worker.config import ConfigError, VmConfig
from pyhv.worker.control import ControlServer
from pyhv.worker.dynmem import DynamicMemoryError
from pyhv.worker.outcome import VmEnd
from pyhv.worker.trace import kinds_from_wire
from tests.support.fuzz import Target

CONFIG = {"name": "vm", "memory": 64 << 20, "vps": 1, "image": "/nonexistent/fuzz.elf",
          "cmdline": "console=ttyS0", "dynamic_memory": True, "minimum": 32 << 20,
          "maximum": 256 << 20}  # fmt: skip


def owner_message(data: bytes) -> None:
    """What the worker does with an owner's message before it reaches the VM."""
    msg = m.decode_op(data)
    if isinstance(msg, m.Boot | m.Incoming):
        m.check_version(msg.protocol, "the owner")
    if isinstance(msg, m.Boot):
        try:
            VmConfig.from_dict(msg.config)  # as pyhv.worker.server does, with its errors
        except (ConfigError, KeyError, TypeError, ValueError):
            pass
    elif isinstance(msg, m.Trace):
        kinds_from_wire(msg.kinds)


def worker_message(data: bytes) -> None:
    """What the owner does with a worker's message (pyhv.worker.process)."""
    msg = m.decode_event(data)
    if isinstance(msg, m.Ended):
        msg.end.to_end()
    elif isinstance(msg, m.TraceEvents):
        try:
            events = [event_from_wire(e) for e in msg.events]
        except TraceError:
            return
        for e in events:  # as `pyhv vm trace` prints them
            e.line()
            e.to_wire()


class _Vm:
    """What the control endpoint serves: a VM's memory status, target and hot-remove."""

    def memory_status(self) -> Any:
        return MemoryStatus(visible_pages=16384, assigned_pages=16384, ballooned_pages=0)

    def set_memory_target(self, target: int) -> Any:
        if target > 1 << 40:
            raise DynamicMemoryError(f"target {target} beyond the maximum")
        return {"target": target}

    def hot_remove_memory(self, pages: int | None) -> Any:
        if pages is not None and pages > 1 << 28:
            raise DynamicMemoryError(f"hot-remove of {pages} pages: more than the VM has")
        return {"requested_pages": pages}


_SERVER = ControlServer.__new__(ControlServer)  # handle() alone: no socket
_SERVER.vm = _Vm()


def control(data: bytes) -> None:
    """A control request as a VM answers it (never an exception: a reply that says why), and
    the reply as `pyhv memory --control` decodes it."""
    reply = _SERVER.handle(data)
    assert isinstance(reply, m.ControlReply)
    m.decode_control_reply(m.encode(reply))
    m.decode_control_reply(data)


class _Sock:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def recv(self, n: int) -> bytes:
        out = self.data[self.at : self.at + n]
        self.at += len(out)
        return out


def framing(data: bytes) -> None:
    """Frames off a socket as both sides read them (a too-long frame is skipped)."""
    sock: Any = _Sock(data)
    for _ in range(32):
        try:
            raw = protocol.recv_frame(sock)
        except protocol.FrameRefused:
            continue
        if raw is None:
            return
        try:
            m.decode_event(raw)
        except m.MessageError:
            pass


def _seeds_owner() -> list[bytes]:
    return [
        m.encode(x)
        for x in (
            m.Boot(CONFIG, m.PROTOCOL_VERSION),
            m.Incoming("token", m.PROTOCOL_VERSION, ("0.0.0.0", 0), 1 << 30, 30.0, 60.0, {}, "x"),
            m.SerialIn(b"ls\r"),
            m.Stop("the owner stops it"),
            m.MemoryCall(3, "limits", (1 << 28, 1 << 30)),
            m.MemoryCall(4, "target", 1 << 29),
            m.Migrate(5, "10.0.0.2", 7000, "t" * 32, {"bandwidth": 1 << 30}),
            m.MigrationDecision(5, "resume"),
            m.Trace(True, ["dm", "io"]),
        )
    ]


def _seeds_worker() -> list[bytes]:
    events = [
        IoEvent(1.5, 0, 0x3F8, "out", 1, 1, 0x41, 900).to_wire(),
        DmEvent(2.5, -1, "guest->host", "STATUS_REPORT", 3, {"num_avail": 5}, [[16, 4]]).to_wire(),
    ]
    status = MemoryStatus(visible_pages=16384, assigned_pages=16000, ballooned_pages=384)
    return [
        m.encode(x)
        for x in (
            m.Started(1234, m.PROTOCOL_VERSION),
            m.SerialOut(b"login: "),
            m.Ended(m.EndReport.of(VmEnd("poweroff", status=0))),
            m.MemoryReply(3, {"plan": "balloon"}, None),
            m.MemoryStatusPushed(status),
            m.MigrationProgress(5, {"phase": "memory", "passes": 1}),
            m.MigrationDone(5, {"downtime": 0.05}),
            m.MigrationFailed(5, "lost", "memory", True),
            m.Listening("127.0.0.1", 7000),
            m.MigratedIn(CONFIG, "10.0.0.1:5000", 3, 16384),
            m.TraceEvents(events),
            m.Refused("message from the owner refused"),
        )
    ]


def _seeds_control() -> list[bytes]:
    return [
        m.encode(m.ControlStatus()),
        m.encode(m.ControlTarget(1 << 29)),
        m.encode(m.ControlHotRemove(1 << 26)),
        m.encode(m.ControlHotRemove()),
        m.encode(m.ControlReply(True, status={"visible_pages": 3}, plan={"step": "balloon"})),
        m.encode(m.ControlReply(False, error="no")),
    ]


def _seeds_framing() -> list[bytes]:
    frames = [struct.pack("<I", len(x)) + x for x in _seeds_worker()]
    return [b"".join(frames[:4]), b"".join(frames[4:]), struct.pack("<I", 1 << 21) + bytes(8)]


OWNER = Target(
    "worker.owner_messages",
    "owner -> worker messages as the worker takes them (pyhv.worker.messages.decode_op)",
    _seeds_owner,
    owner_message,
    (m.MessageError,),
    json=True,
)
WORKER = Target(
    "worker.worker_messages",
    "worker -> owner messages as the owner takes them (decode_event, trace events)",
    _seeds_worker,
    worker_message,
    (m.MessageError,),
    json=True,
)
CONTROL = Target(
    "worker.control",
    "a VM's control socket requests and replies (pyhv.worker.control)",
    _seeds_control,
    control,
    (m.MessageError,),
    json=True,
)
FRAMING = Target(
    "worker.framing",
    "the worker socket's length-prefixed framing (pyhv.worker.protocol.recv_frame)",
    _seeds_framing,
    framing,
    (protocol.ProtocolError,),
    max_size=8192,
)

TARGETS = [OWNER, WORKER, CONTROL, FRAMING]
