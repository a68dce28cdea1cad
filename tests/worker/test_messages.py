"""Every message between a worker and its owner is declared once: each one read back from its
wire form is the message sent, and anything else a peer sends (random bytes, random JSON, a
declared message with one field wrong, missing or extra, an unknown tag, a frame too long) is
refused with an error that names what is wrong, and the receiver reads on."""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.dynmem.status import MemoryStatus, VpCounters
from pyhv.worker import messages as m
from pyhv.worker import protocol
from pyhv.worker.config import ConfigError, VmConfig
from pyhv.worker.process import WorkerProcess
from tests.support.hostile import json_values

STATUS = MemoryStatus(1024, 768, 256, 500, 200, 756, vps=(VpCounters(0, halt=3),))

#: One of each declared message.
OPS: list[m.Op] = [
    m.Boot({"name": "vm", "memory": 1 << 30}, m.PROTOCOL_VERSION),
    m.Incoming(
        "secret",
        m.PROTOCOL_VERSION,
        listen=("127.0.0.1", 4444),
        max_memory=1 << 30,
        faults={"a": "b"},
    ),
    m.SerialIn(b"\x00\xffmem\r"),
    m.Stop("asked"),
    m.MemoryCall(7, "target", 1 << 30),
    m.MemoryCall(8, "limits", (1 << 28, 1 << 32)),
    m.Migrate(9, "10.0.0.2", 7000, "secret", {"compress": True}),
    m.MigrationDecision(9, "resume"),
    m.Trace(True, ["dm", "io"]),
    m.Trace(False),
    m.Hello(m.PROTOCOL_VERSION, "s" * 43),
    m.Resume(),
]
EVENTS: list[m.Event] = [
    m.Started(123, m.PROTOCOL_VERSION),
    m.SerialOut(b"login: "),
    m.Ended(m.EndReport("triple_fault", vp=1, registers={"rip": (1 << 64) - 1}, detail="x")),
    m.MemoryReply(7, result={"assigned": 5}),
    m.MemoryReply(8, error="no"),
    m.MemoryStatusPushed(STATUS),
    m.MigrationProgress(9, {"phase": "memory", "pass": 2}),
    m.MigrationDone(9, {"pages": 10}),
    m.MigrationFailed(9, "lost", "commit", in_doubt=True),
    m.Listening("127.0.0.1", 4444),
    m.MigratedIn({"name": "vm"}, "10.0.0.1:5555", 3, 1000),
    m.TraceEvents([{"kind": "io", "t": 1.5}]),
    m.Committed({"name": "vm"}),
    m.Adopted(
        m.PROTOCOL_VERSION,
        1,
        {"name": "vm"},
        "running",
        memory=STATUS,
        serial=b"pyhv> ",
        migration=9,
        counters={"owners": 2},
    ),
    m.Refused("why"),
]


@pytest.mark.unit
def test_every_declared_message_has_a_sample_here() -> None:
    assert {type(x) for x in OPS} == set(m.Op.__args__)  # type: ignore[attr-defined]
    assert {type(x) for x in EVENTS} == set(m.Event.__args__)  # type: ignore[attr-defined]


@pytest.mark.unit
@pytest.mark.parametrize("msg", OPS, ids=lambda x: type(x).__name__)
def test_an_owners_message_read_back_is_the_message_sent(msg: m.Op) -> None:
    assert m.decode_op(m.encode(msg)) == msg


@pytest.mark.unit
@pytest.mark.parametrize("msg", EVENTS, ids=lambda x: type(x).__name__)
def test_a_workers_message_read_back_is_the_message_sent(msg: m.Event) -> None:
    assert m.decode_event(m.encode(msg)) == msg


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"op": "format_disk"}, "Invalid value 'format_disk' - at `$.op` (known: 'boot', "),
        ({"ev": "stop"}, "Object missing required field `op`"),
        ({"op": "stop", "why": 5}, "Expected `str`, got `int` - at `$.why`"),
        ({"op": "memory", "id": True, "call": "status"}, "Expected `int`, got `bool` - at `$.id`"),
        ({"op": "memory", "id": 1 << 70, "call": "status"}, "<= 9223372036854775807 - at `$.id`"),
        ({"op": "memory", "id": -1, "call": "status"}, "Expected `int` >= 0 - at `$.id`"),
        ({"op": "memory", "id": 1, "call": "format"}, "Invalid enum value 'format' - at `$.call`"),
        ({"op": "memory", "id": 1}, "Object missing required field `call`"),
        ({"op": "stop", "why": "x", "sudo": True}, "Object contains unknown field `sudo`"),
        ({"op": "migrate", "id": 1, "host": "h", "port": 70000, "token": "t"}, "at `$.port`"),
        ({"op": "migrate", "id": 1, "host": "h", "port": 1, "token": ""}, "at `$.token`"),
        ({"op": "incoming", "token": "t", "timeout": -1}, "Expected `float` > 0.0"),
        ({"op": "migration_decision", "id": 1, "decision": "maybe"}, "at `$.decision`"),
        ({"op": "stop", "why": "x" * 70000}, "Expected `str` of length <= 65536"),
        ([1, 2], "Expected `object`, got `array`"),
    ],
)
def test_an_owners_message_that_is_not_declared_so_is_refused_naming_the_field(
    raw: object, words: str
) -> None:
    with pytest.raises(m.MessageError, match=r"^message from the owner refused: ") as e:
        m.decode_op(json.dumps(raw).encode())
    assert words in str(e.value)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"ev": "memory_status", "status": "all"}, "Expected `object`, got `str` - at `$.status`"),
        (
            {"ev": "memory_status", "status": dict(STATUS.to_wire(), visible_pages=1)},
            "must equal visible_pages 1",
        ),
        ({"ev": "ended", "end": {"reason": "exploded"}}, "unknown VM end reason 'exploded'"),
        ({"ev": "ended", "end": {"reason": "stopped", "vp": 5000}}, "at `$.end.vp`"),
        ({"ev": "started", "pid": "1"}, "Expected `int`, got `str` - at `$.pid`"),
        ({"ev": "started"}, "Object missing required field `pid`"),
        ({"ev": "serial", "data": "%%%"}, "Invalid base64 encoded string - at `$.data`"),
        ({"ev": "listening", "host": "h", "port": True}, "Expected `int`, got `bool`"),
        ({"ev": "migration_failed", "id": 1, "error": None}, "Expected `str`, got `null`"),
        ({"ev": "oops"}, "(known: 'started', 'serial', 'ended', "),
    ],
)
def test_a_workers_message_that_is_not_declared_so_is_refused_naming_the_field(
    raw: object, words: str
) -> None:
    with pytest.raises(m.MessageError, match=r"^message from the worker refused: ") as e:
        m.decode_event(json.dumps(raw).encode())
    assert words in str(e.value)


@pytest.mark.unit
def test_a_version_1_worker_which_names_no_version_is_refused() -> None:
    started = m.decode_event(b'{"ev":"started","pid":1}')
    assert isinstance(started, m.Started)
    with pytest.raises(m.MessageError, match="speaks worker protocol version 1, this pyhv"):
        m.check_version(started.protocol, "the worker")


@pytest.mark.unit
def test_a_peer_of_another_protocol_version_is_refused() -> None:
    with pytest.raises(m.MessageError, match="speaks worker protocol version 1, this pyhv"):
        m.check_version(m.decode_op(b'{"op":"boot","config":{},"protocol":1}').protocol, "owner")  # type: ignore[union-attr]


_json = json_values()


def _mutated(samples: list[Any]) -> st.SearchStrategy[bytes]:
    """A declared message with one field replaced by any JSON, dropped, or one added."""

    @st.composite
    def one(draw: st.DrawFn) -> bytes:
        wire = json.loads(m.encode(draw(st.sampled_from(samples))))
        key = draw(st.sampled_from(sorted(wire)))
        how = draw(st.sampled_from(["replace", "drop", "add"]))
        if how == "replace":
            wire[key] = draw(_json)
        elif how == "drop":
            del wire[key]
        else:
            wire[draw(st.text(min_size=1, max_size=8))] = draw(_json)
        return json.dumps(wire).encode()

    return one()


def _refused_or_declared(decode: Callable[[bytes], Any], union: Any, raw: bytes) -> None:
    try:
        msg = decode(raw)
    except m.MessageError as e:
        assert str(e).startswith("message from the ")
        return
    assert isinstance(msg, union.__args__)
    assert decode(m.encode(msg)) == msg  # what decodes is a message like any other


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()) | _mutated(OPS))
def test_anything_an_owner_sends_is_an_owners_message_or_refused(raw: bytes) -> None:
    _refused_or_declared(m.decode_op, m.Op, raw)


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode()) | _mutated(EVENTS))
def test_anything_a_worker_sends_is_a_workers_message_or_refused(raw: bytes) -> None:
    _refused_or_declared(m.decode_event, m.Event, raw)


@pytest.mark.unit
@pytest.mark.parametrize("nest", [b"[", b'{"a":'])
def test_a_message_nested_too_deeply_is_refused_not_a_recursion_error(nest: bytes) -> None:
    # found by the fuzz campaign (tests/fuzz): msgspec recursed out of the stack, and the
    # RecursionError ended the owner's reader thread
    deep = b'{"op":' + nest * 5000
    for decode in (m.decode_op, m.decode_event, m.decode_control, m.decode_control_reply):
        with pytest.raises(m.MessageError, match="nested too deeply"):
            decode(deep)
        with pytest.raises(m.MessageError, match="nested too deeply"):
            decode(deep.replace(b'"op"', b'"ev"'))


@pytest.mark.unit
def test_a_boot_config_whose_image_name_is_too_long_is_a_config_error() -> None:
    # found by the fuzz campaign: Path.is_file() raised OSError (ENAMETOOLONG) past the
    # worker's checks of its owner's configuration
    with pytest.raises(ConfigError, match="cannot be read: File name too long"):
        VmConfig.from_dict({"image": "/x" * 4096, "memory": 64 << 20, "vps": 1})


@pytest.mark.unit
def test_a_frame_too_long_is_skipped_and_refused_and_the_next_one_is_read() -> None:
    a, b = socket.socketpair()
    too_long = struct.pack("<I", protocol.MAX_MESSAGE + 1) + b"x" * (protocol.MAX_MESSAGE + 1)

    def peer() -> None:  # on a thread: the socket's buffer holds less than the frame
        a.sendall(too_long)
        protocol.send_message(a, m.Stop("after"))

    sender = threading.Thread(target=peer)
    with a, b:
        sender.start()
        with pytest.raises(protocol.FrameRefused, match=r"length 1048577 exceeds 1048576"):
            protocol.recv_frame(b)
        raw = protocol.recv_frame(b)
        assert raw is not None and m.decode_op(raw) == m.Stop("after")
        sender.join()


#: What a hostile owner sends a real worker: each is refused and answered with a Refused.
GARBAGE = [
    b"not json",
    b'{"op":"format_disk"}',
    b'{"op":"stop","why":17}',
    b'{"op":"memory","id":true,"call":"status"}',
    b'{"op":"boot","config":{},"protocol":2}',  # declared, but not now
    struct.pack("<I", protocol.MAX_MESSAGE + 1),  # a frame too long: the header, then its bytes
]


@pytest.mark.guest
def test_a_worker_refuses_garbage_from_its_owner_says_why_and_its_vm_runs_on(
    test_guest: Callable[[str], Path],
) -> None:
    with WorkerProcess(VmConfig.create(image=test_guest("halt_loop"), memory="32M")) as w:
        w.start()
        w.serial.read_until(b"idle\n", 60)
        assert w._sock is not None
        with w._send_lock:
            for raw in GARBAGE:
                if raw.startswith(b"\x01\x00\x10\x00"):  # the too-long frame's header and body
                    w._sock.sendall(raw + b" " * (protocol.MAX_MESSAGE + 1))
                else:
                    protocol.send_frame(w._sock, raw)
        # The worker reads in order: once this answer is back, every refusal came before it.
        with pytest.raises(Exception, match="Dynamic Memory|not"):
            w.memory_status()
        assert w.refused_by_worker == len(GARBAGE)
        assert w.wait(0) is None  # the VM runs on
        w.stop()
        end = w.wait(30)
    assert end is not None and end.reason == "stopped"


class _Vm:
    """What the control endpoint needs of a VM."""

    def memory_status(self) -> dict[str, int]:
        return {"assigned_pages": 4096}

    def set_memory_target(self, target: int) -> dict[str, int]:
        return {"goal_pages": target // 4096}


@pytest.mark.unit
def test_the_control_socket_refuses_garbage_with_its_reason_and_serves_on(
    tmp_path: Path,
) -> None:
    from pyhv.worker.control import ControlServer, request

    path = str(tmp_path / "control.sock")
    server = ControlServer(path, _Vm())
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            for raw in (b"{", b'{"op":"format"}', b'{"op":"target","bytes":-1}', b"[]"):
                protocol.send_frame(s, raw)
                reply = m.decode_control_reply(protocol.recv_frame(s) or b"")
                assert not reply.ok and reply.error and "control request refused" in reply.error
        assert request(path, m.ControlTarget(8192))["plan"] == {"goal_pages": 2}
        assert request(path, m.ControlStatus())["status"] == {"assigned_pages": 4096}
    finally:
        server.close()
