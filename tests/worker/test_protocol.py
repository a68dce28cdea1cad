"""The worker's local-socket protocol and its end report survive the trip between processes,
and a peer sending garbage is refused, not obeyed."""

from __future__ import annotations

import socket
import struct

import pytest

from pyhv.worker import messages, protocol
from pyhv.worker.config import ConfigError, VmConfig, parse_size
from pyhv.worker.outcome import VmEnd

pytestmark = pytest.mark.unit


def test_messages_round_trip_over_a_socket_pair() -> None:
    a, b = socket.socketpair()
    with a, b:
        protocol.send_message(a, messages.SerialIn(b"\x00\xffmem\r"))
        raw = protocol.recv_frame(b)
        assert raw is not None and messages.decode_op(raw) == messages.SerialIn(b"\x00\xffmem\r")
        a.close()
        assert protocol.recv_frame(b) is None


@pytest.mark.parametrize(
    "raw",
    [
        struct.pack("<I", 5) + b"[1,2]",  # not an object
        struct.pack("<I", 3) + b"{x}",  # not JSON
        struct.pack("<I", protocol.MAX_MESSAGE + 1),  # too long
        struct.pack("<I", 10) + b"{}",  # cut short
    ],
)
def test_a_malformed_message_is_a_protocol_error(raw: bytes) -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(raw)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(protocol.ProtocolError):
            protocol.recv(b)


def test_serial_data_must_be_base64_text() -> None:
    with pytest.raises(messages.MessageError, match="Invalid base64 encoded string"):
        messages.decode_op(b'{"op":"serial","data":"not base64!"}')
    with pytest.raises(messages.MessageError, match="Expected `bytes`, got `int` - at `\\$.data`"):
        messages.decode_op(b'{"op":"serial","data":42}')


def test_a_vm_end_report_round_trips_and_refuses_unknown_reasons() -> None:
    end = VmEnd("triple_fault", vp=1, registers={"rip": 0x100000}, detail="x")
    assert VmEnd.from_dict(end.to_dict()) == end
    with pytest.raises(ValueError, match="unknown VM end reason"):
        VmEnd.from_dict({"reason": "exploded"})


def test_exit_codes_say_how_the_vm_ended() -> None:
    assert VmEnd("poweroff", status=42).exit_code == 42
    assert VmEnd("stopped").exit_code == 0
    assert VmEnd("triple_fault").exit_code == 3
    assert VmEnd("emulation_error").exit_code == 4
    assert VmEnd("worker_error").exit_code == 5


def test_a_configuration_received_from_another_process_is_validated_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "g.elf"
    image.write_bytes(b"\x7fELF")
    cfg = VmConfig.create(image=image, memory="1G", vps=2, cmdline="a=b")
    assert VmConfig.from_dict(cfg.to_dict()) == cfg
    bad = cfg.to_dict() | {"vps": 0}
    with pytest.raises(ConfigError, match="VP count 0"):
        VmConfig.from_dict(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [("512M", 512 << 20), ("1G", 1 << 30), ("2GiB", 2 << 30), ("65536k", 64 << 20)],
)
def test_memory_sizes_take_units(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_a_command_line_that_does_not_fit_its_page_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path / "g.elf"
    image.write_bytes(b"")
    with pytest.raises(ConfigError, match="at most 4095 bytes"):
        VmConfig.create(image=image, cmdline="x" * 4096)
