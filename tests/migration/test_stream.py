"""The migration stream without a VM: frames carry their payloads intact, every corruption or
loss is caught, only holders of the token get past the handshake, and the bandwidth limit holds
the sender back."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyhv.migration import frames
from pyhv.migration import stream as st
from pyhv.migration.stream import Frame, FrameSocket, MigrationError

pytestmark = pytest.mark.unit


@pytest.fixture
def pair() -> Iterator[tuple[FrameSocket, FrameSocket]]:
    a, b = socket.socketpair()
    fa, fb = FrameSocket(a, timeout=5), FrameSocket(b, timeout=5)
    fa.authenticated = fb.authenticated = True
    yield fa, fb
    fa.close()
    fb.close()


def test_a_frame_arrives_with_its_type_address_count_and_payload(pair: Any) -> None:
    a, b = pair
    a.send(Frame.PAGES, b"\x07" * 8192, count=2, addr=0x200000)
    a.send_json(Frame.PASS_END, {"pass": 1})
    assert b.recv() == (Frame.PAGES, 0, 2, 0x200000, b"\x07" * 8192)
    assert b.expect(Frame.PASS_END, frames.PassEnd) == frames.PassEnd(1)
    assert a.bytes_sent == b.bytes_received == 2 * st.HEADER.size + 8192 + len(b'{"pass":1}')


def test_a_flipped_payload_bit_fails_the_frame_checksum(pair: Any) -> None:
    a, b = pair
    a.corrupt_next = True
    a.send(Frame.PAGES, bytes(4096), count=1, addr=0)
    with pytest.raises(MigrationError, match="failed its checksum"):
        b.recv()


def test_a_flipped_header_bit_fails_the_checksum_too(pair: Any) -> None:
    a, b = pair
    head = bytearray(st.HEADER.pack(Frame.PAGES, 0, 0, 0, 4, 1, 0x1000, 0))
    good = st._check(bytes(head[: st._HEAD_NO_CHECK.size]), b"abcd")
    head = bytearray(st.HEADER.pack(Frame.PAGES, 0, 0, 0, 4, 1, 0x2000, good))  # addr changed
    a.sock.sendall(bytes(head) + b"abcd")
    with pytest.raises(MigrationError, match="checksum"):
        b.recv()


def test_a_lost_frame_is_caught_by_its_sequence_number(pair: Any) -> None:
    a, b = pair
    a.send_json(Frame.READY, {})
    b.recv()
    a._seq_out += 1  # as if one frame vanished
    a.send_json(Frame.READY, {})
    with pytest.raises(MigrationError, match="sequence 2 where 1 was due"):
        b.recv()


def test_an_unknown_frame_type_or_an_oversized_frame_is_refused(pair: Any) -> None:
    a, b = pair
    a.sock.sendall(st.HEADER.pack(99, 0, 0, 0, 0, 0, 0, 0))
    with pytest.raises(MigrationError, match="unknown frame type 99"):
        b.recv()
    c, d = socket.socketpair()
    fc, fd = FrameSocket(c), FrameSocket(d)  # not authenticated: 64 KiB at most
    c.sendall(st.HEADER.pack(Frame.CONFIG, 0, 0, 0, 1 << 20, 0, 0, 0))
    with pytest.raises(MigrationError, match="exceeds the limit"):
        fd.recv()
    fc.close()
    fd.close()


def test_an_abort_frame_raises_the_peers_reason(pair: Any) -> None:
    a, b = pair
    b.peer = "destination"
    a.abort("out of memory")
    with pytest.raises(st.PeerAborted, match="the destination aborted: out of memory"):
        b.recv()


def test_zero_page_runs_round_trip() -> None:
    runs = [(0x1000, 3), (0x100000000, 1 << 20)]
    assert st.unpack_zero_runs(st.pack_zero_runs(runs)) == runs
    with pytest.raises(MigrationError):
        st.unpack_zero_runs(b"\x00" * 15)


def _handshake(src_token: str, dst_token: str) -> tuple[BaseException | None, BaseException | None]:
    a, b = socket.socketpair()
    errors: list[BaseException | None] = [None, None]

    def side(i: int, fn: Callable[[FrameSocket, bytes], None], s: socket.socket, t: str) -> None:
        try:
            fn(FrameSocket(s, timeout=5), st.token_bytes(t))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            errors[i] = e

    t = threading.Thread(target=side, args=(1, st.authenticate_destination, b, dst_token))
    t.start()
    side(0, st.authenticate_source, a, src_token)
    t.join(10)
    a.close()
    b.close()
    return errors[0], errors[1]


def test_both_sides_holding_the_token_pass_the_challenge() -> None:
    assert _handshake("shared-secret-1", "shared-secret-1") == (None, None)


def test_a_source_without_the_token_is_refused_and_told_why() -> None:
    src_err, dst_err = _handshake("wrong-secret-1", "shared-secret-1")
    assert isinstance(dst_err, MigrationError) and "authentication failed" in str(dst_err)
    assert isinstance(src_err, MigrationError) and "authentication failed" in str(src_err)


def test_a_short_token_is_refused() -> None:
    with pytest.raises(MigrationError, match="too short"):
        st.token_bytes("abc")


def test_the_bandwidth_limit_holds_the_sender_back(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    clock = [100.0]
    monkeypatch.setattr(st.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(
        st.time, "sleep", lambda s: (slept.append(s), clock.__setitem__(0, clock[0] + s))
    )
    a, b = socket.socketpair()
    fa = FrameSocket(a, bandwidth=1 << 20)

    def drain() -> None:
        while b.recv(1 << 20):
            pass

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    for _ in range(4):
        fa.send(Frame.PAGES, bytes(256 << 10), count=64)
    # 4 x (256 KiB + header) at 1 MiB/s: the sender waited about a second in all
    assert sum(slept) == pytest.approx(4 * ((256 << 10) + 32) / (1 << 20))
    a.close()
    reader.join(5)
    b.close()


@pytest.mark.parametrize(
    "mac", ["é" * 64, None, 12, ["x"]], ids=["non-ascii", "null", "int", "list"]
)
def test_a_source_sending_a_non_ascii_or_non_text_mac_is_refused_as_unauthenticated(
    mac: object,
) -> None:
    a, b = socket.socketpair()
    err: list[BaseException | None] = [None]

    def destination() -> None:
        try:
            st.authenticate_destination(FrameSocket(b, timeout=5), st.token_bytes("secret-123"))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            err[0] = e

    t = threading.Thread(target=destination)
    t.start()
    src = FrameSocket(a, timeout=5)
    src.expect(Frame.HELLO, frames.Hello)
    src.send_json(Frame.AUTH, {"version": st.VERSION, "nonce": "00" * 32, "mac": mac})
    t.join(10)
    a.close()
    b.close()
    assert isinstance(err[0], MigrationError) and "authentication failed" in str(err[0])
