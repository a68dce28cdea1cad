"""The migration stream without a VM: frames carry their payloads intact, every corruption or
loss is caught, only holders of the token get past the handshake, and the bandwidth limit holds
the sender back."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from pyhv.migration import frames
from pyhv.migration import stream as st
from pyhv.migration.stream import Frame, FrameSocket, MigrationError

pytestmark = pytest.mark.unit


@pytest.fixture
def pair() -> Iterator[tuple[FrameSocket, FrameSocket]]:
    a, b = socket.socketpair()
    fa, fb = FrameSocket(a, timeout=5), FrameSocket(b, timeout=5)
    fa.seal(b"\x01" * 32, b"\x02" * 32, False)
    fb.seal(b"\x02" * 32, b"\x01" * 32, False)
    yield fa, fb
    fa.close()
    fb.close()


def test_a_frame_arrives_with_its_type_address_count_and_payload(pair: Any) -> None:
    a, b = pair
    a.send(Frame.PAGES, b"\x07" * 8192, count=2, addr=0x200000)
    a.send_json(Frame.PASS_END, {"pass": 1})
    assert b.recv() == (Frame.PAGES, 0, 2, 0x200000, b"\x07" * 8192)
    assert b.expect(Frame.PASS_END, frames.PassEnd) == frames.PassEnd(1)
    sealed = 2 * (st.HEADER.size + st.TAG)
    assert a.bytes_sent == b.bytes_received == sealed + 8192 + len(b'{"pass":1}')


def test_a_flipped_payload_bit_fails_the_frame_tag(pair: Any) -> None:
    a, b = pair
    a.corrupt_next = True
    a.send(Frame.PAGES, bytes(4096), count=1, addr=0)
    with pytest.raises(MigrationError, match="PAGES frame #0 .* failed authentication"):
        b.recv()
    assert b.frames_refused == 1


def test_a_flipped_header_bit_fails_the_handshake_checksum() -> None:
    a, b = socket.socketpair()
    fb = FrameSocket(b, timeout=5)
    head = bytearray(st.HEADER.pack(Frame.HELLO, 0, 0, 0, 4, 1, 0x1000, 0))
    good = st._check(bytes(head[: st._HEAD_NO_CHECK.size]), b"abcd")
    head = bytearray(st.HEADER.pack(Frame.HELLO, 0, 0, 0, 4, 1, 0x2000, good))  # addr changed
    a.sendall(bytes(head) + b"abcd")
    with pytest.raises(MigrationError, match="checksum"):
        fb.recv()
    a.close()
    fb.close()


def test_a_flipped_header_bit_fails_the_frame_tag() -> None:
    a, raw = socket.socketpair()
    fa = FrameSocket(a, timeout=5)
    fa.seal(b"\x01" * 32, b"\x02" * 32, False)
    fa.send(Frame.PAGES, b"abcd", count=1, addr=0x1000)
    wire = bytearray(raw.recv(1 << 16))
    assert st.decode_frame(bytes(wire), recv_key=b"\x01" * 32) == (
        Frame.PAGES,
        0,
        1,
        0x1000,
        b"abcd",
    )
    wire[17] ^= 0x20  # addr 0x1000 -> 0x3000
    with pytest.raises(
        MigrationError, match=r"PAGES frame #0 \(4 bytes at 0x3000\) .* failed authentication"
    ):
        st.decode_frame(bytes(wire), recv_key=b"\x01" * 32)
    fa.close()
    raw.close()


def test_encrypted_frames_arrive_intact_and_carry_no_plaintext() -> None:
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    fa, fb = FrameSocket(a, timeout=5), FrameSocket(d, timeout=5)
    fa.seal(b"\x01" * 32, b"\x02" * 32, True)
    fb.seal(b"\x02" * 32, b"\x01" * 32, True)
    secret = b"guest secret " * 300
    fa.send(Frame.PAGES, secret, count=1, addr=0x5000)
    wire = b.recv(1 << 16)
    assert len(wire) == st.HEADER.size + len(secret) + st.TAG
    assert b"guest secret" not in wire
    c.sendall(wire)
    assert fb.recv() == (Frame.PAGES, 0, 1, 0x5000, secret)
    wrong = bytearray(wire)
    wrong[100] ^= 1
    with pytest.raises(MigrationError, match="PAGES frame #0 .* failed authentication"):
        st.decode_frame(bytes(wrong), recv_key=b"\x01" * 32, encrypt=True)
    for s in (fa, fb, b, c):
        s.close()


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


def _sealed_pair(encrypt: bool) -> tuple[FrameSocket, FrameSocket]:
    """Source and destination after a real handshake over a socket pair."""
    a, b = socket.socketpair()
    src, dst = FrameSocket(a, timeout=5, peer="destination"), FrameSocket(b, timeout=5)
    err: list[BaseException] = []

    def destination() -> None:
        try:
            st.authenticate_destination(dst, st.token_bytes("shared-secret-1"))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            err.append(e)

    t = threading.Thread(target=destination)
    t.start()
    st.authenticate_source(src, st.token_bytes("shared-secret-1"), encrypt)
    t.join(10)
    assert not err
    return src, dst


@pytest.mark.parametrize("encrypt", [False, True], ids=["authenticated", "encrypted"])
def test_after_the_handshake_both_sides_seal_with_the_same_keys(encrypt: bool) -> None:
    src, dst = _sealed_pair(encrypt)
    assert src.authenticated and dst.authenticated
    assert src.encrypted is dst.encrypted is encrypt
    src.send(Frame.PAGES, b"\x5a" * 4096, count=1, addr=0x2000)
    assert dst.recv() == (Frame.PAGES, 0, 1, 0x2000, b"\x5a" * 4096)
    dst.send_json(Frame.READY, frames.Empty())
    assert src.expect(Frame.READY, frames.Empty) == frames.Empty()
    src.close()
    dst.close()


def test_a_replayed_frame_renumbered_is_refused() -> None:
    src, dst = _sealed_pair(False)
    c, d = socket.socketpair()
    tap = src.sock
    src.sock = c  # what the source sends now goes to d
    src.send(Frame.PAGES, b"\x11" * 4096, count=1, addr=0x2000)
    src.send(Frame.PAGES, b"\x22" * 4096, count=1, addr=0x3000)
    one = d.recv(st.HEADER.size + 4096 + st.TAG, socket.MSG_WAITALL)
    replay = bytearray(one)
    seq = int.from_bytes(one[4:8], "little")
    replay[4:8] = (seq + 1).to_bytes(4, "little")  # renumbered as the next frame
    tap.sendall(one)
    assert dst.recv()[4] == b"\x11" * 4096
    tap.sendall(bytes(replay))  # the same frame again, where the 0x3000 one was due
    with pytest.raises(MigrationError, match="failed authentication"):
        dst.recv()
    for s in (src, dst, c, d, tap):
        s.close()


def _fake_peer(role: str, script: Callable[[FrameSocket], None]) -> BaseException | None:
    """The error of the real `role` side ("source" or "destination") against a peer that
    runs `script`."""
    a, b = socket.socketpair()
    err: list[BaseException | None] = [None]

    def real() -> None:
        fs = FrameSocket(a, timeout=5)
        try:
            if role == "source":
                st.authenticate_source(fs, st.token_bytes("shared-secret-1"), True)
            else:
                st.authenticate_destination(fs, st.token_bytes("shared-secret-1"))
        except BaseException as e:  # noqa: BLE001 - returned to the test
            err[0] = e

    t = threading.Thread(target=real)
    t.start()
    try:
        script(FrameSocket(b, timeout=5))
    except (MigrationError, OSError):
        pass
    t.join(10)
    a.close()
    b.close()
    return err[0]


def test_a_source_of_stream_version_1_is_refused_naming_both_versions() -> None:
    def old_source(fs: FrameSocket) -> None:
        fs.recv()
        fs.send_json(Frame.AUTH, {"version": 1, "nonce": "00" * 32, "mac": "x"})
        fs.recv()

    err = _fake_peer("destination", old_source)
    assert isinstance(err, MigrationError)
    assert "the source speaks stream version 1, this host 2" in str(err)


def test_a_destination_of_stream_version_1_is_refused_naming_both_versions() -> None:
    def old_destination(fs: FrameSocket) -> None:
        fs.send_json(Frame.HELLO, {"version": 1, "nonce": "00" * 32})
        fs.recv()

    err = _fake_peer("source", old_destination)
    assert isinstance(err, MigrationError)
    assert "the destination speaks stream version 1, this host 2" in str(err)
    assert "same pyhv release" in str(err)


def test_a_man_in_the_middle_cannot_switch_encryption_off() -> None:
    """The mode is under the source's MAC: an AUTH whose `encrypt` was flipped fails it."""
    src_err: list[BaseException | None] = [None]

    def stripping_relay(dst_side: FrameSocket) -> None:
        a, b = socket.socketpair()
        src = FrameSocket(a, timeout=5)

        def source() -> None:
            try:
                st.authenticate_source(src, st.token_bytes("shared-secret-1"), True)
            except BaseException as e:  # noqa: BLE001 - returned to the test
                src_err[0] = e

        t = threading.Thread(target=source)
        t.start()
        relay = FrameSocket(b, timeout=5)
        relay.send(Frame.HELLO, dst_side.recv()[4])
        auth = json.loads(relay.recv()[4])
        auth["encrypt"] = False
        dst_side.send_json(Frame.AUTH, auth)
        try:
            dst_side.recv()
        finally:
            relay.close()
            t.join(10)

    err = _fake_peer("destination", stripping_relay)
    assert isinstance(err, MigrationError) and "authentication failed" in str(err)


def test_decode_frame_reads_one_frame_from_bytes_as_the_socket_does() -> None:
    a, raw = socket.socketpair()
    fa = FrameSocket(a, timeout=5)
    fa.send_json(Frame.HELLO, frames.Hello(2, "ab" * 32))  # a handshake frame: checksummed
    fa.seal(b"\x01" * 32, b"\x02" * 32, True)
    fa.send(Frame.ZERO, st.pack_zero_runs([(0x1000, 2)]), count=1)  # frame #1, sealed
    wire = raw.recv(1 << 16)
    hello_len = st.HEADER.size + len(frames.encode(frames.Hello(2, "ab" * 32)))
    hello, sealed = wire[:hello_len], wire[hello_len:]
    assert st.decode_frame(hello)[0] is Frame.HELLO
    got = st.decode_frame(sealed, seq=1, recv_key=b"\x01" * 32, encrypt=True)
    assert st.unpack_zero_runs(got[4]) == [(0x1000, 2)]
    with pytest.raises(MigrationError, match="3 bytes after the frame"):
        st.decode_frame(hello + b"xyz")
    with pytest.raises(ConnectionError):
        st.decode_frame(sealed[:-1], seq=1, recv_key=b"\x01" * 32, encrypt=True)
    with pytest.raises(MigrationError, match="frame sequence 1 where 0 was due"):
        st.decode_frame(sealed, recv_key=b"\x01" * 32, encrypt=True)
    fa.close()
    raw.close()


@settings(max_examples=300, deadline=None)
@given(data=hst.binary(max_size=200), sealed=hst.booleans(), encrypt=hst.booleans())
def test_any_bytes_decode_as_a_frame_or_are_refused_with_a_clear_error(
    data: bytes, sealed: bool, encrypt: bool
) -> None:
    try:
        st.decode_frame(data, recv_key=b"\x01" * 32 if sealed else None, encrypt=encrypt)
    except (MigrationError, ConnectionError) as e:
        assert str(e)


@pytest.mark.parametrize("encrypt", [False, True], ids=["authenticated", "encrypted"])
def test_a_payload_built_in_the_streams_buffer_is_sealed_where_it_lies(encrypt: bool) -> None:
    src, dst = _sealed_pair(encrypt)
    for fill in (b"\x01", b"\x02"):  # the buffer is reused: each frame carries its own bytes
        buf = src.payload_buffer(8192)
        buf[:] = fill * 8192
        src.send(Frame.PAGES, buf, count=2, addr=0x4000)
        assert dst.recv() == (Frame.PAGES, 0, 2, 0x4000, fill * 8192)
    src.send(Frame.PAGES, b"\x03" * 4096, count=1, addr=0x9000)  # any other payload still works
    assert dst.recv()[4] == b"\x03" * 4096
    src.close()
    dst.close()


def test_a_page_frame_is_checked_where_it_landed_and_a_flipped_bit_there_is_refused() -> None:
    # 1 MiB: the receiver's tag takes the header and the pages as two pieces (no copy), the
    # sender's one piece (the pages built beside the header): the tags must agree
    src, dst = _sealed_pair(False)
    ram = memoryview(bytearray(2 << 20))
    pages = bytes(range(256)) * 4096

    def send(corrupt: bool) -> None:
        buf = src.payload_buffer(len(pages))
        buf[:] = pages
        src.corrupt_next = corrupt
        src.send(Frame.PAGES, buf, count=256, addr=0x100000)

    for corrupt in (False, True):
        t = threading.Thread(target=send, args=(corrupt,))
        t.start()
        ftype, flags, length, count, addr, check = dst.recv_header()
        target = ram[addr : addr + length]
        if corrupt:
            with pytest.raises(MigrationError, match=r"PAGES frame #\d+ .* failed authentication"):
                dst.recv_payload_into(target, ftype, flags, count, addr, check)
        else:
            dst.recv_payload_into(target, ftype, flags, count, addr, check)
            assert bytes(target) == pages
        t.join(10)
    assert dst.frames_refused == 1
    src.close()
    dst.close()


@pytest.mark.parametrize("encrypt", [False, True], ids=["authenticated", "encrypted"])
def test_a_data_stream_joins_under_keys_of_its_own_and_a_stranger_cannot(encrypt: bool) -> None:
    src, dst = _sealed_pair(encrypt)
    a, b = socket.socketpair()
    data_src = st.join_source(src, a, 2)
    data_dst = st.join_destination(dst, b, 3)
    assert data_dst.index == 2 and data_dst.encrypted is encrypt
    data_src.send(Frame.PAGES, b"\x33" * 4096, count=1, addr=0x5000)
    assert data_dst.recv() == (Frame.PAGES, 0, 1, 0x5000, b"\x33" * 4096)
    # each stream's keys are its own (a frame moved to another stream fails its tag there)
    keys = src.stream_keys
    assert keys is not None and len({keys(0), keys(1), keys(2)}) == 3
    other, other_dst = _sealed_pair(encrypt)  # another migration, other keys
    strangers: list[Callable[[socket.socket], object]] = [
        lambda c: st.join_source(other, c, 1),  # sealed under the wrong keys
        lambda c: st.join_source(src, c, 3),  # a stream out of range (3 of 3)
        lambda c: FrameSocket(c).send_json(Frame.HELLO, frames.Hello(2, "00" * 32)),
    ]
    for stranger in strangers:
        c, d = socket.socketpair()
        stranger(c)
        with pytest.raises(MigrationError, match="refused"):
            st.join_destination(dst, d, 3)
        c.close()
    other_dst.close()
    for fs in (src, dst, data_src, data_dst, other):
        fs.close()


@pytest.mark.parametrize("streams", [0, 17, True, "2", 2.0])
def test_a_stream_count_out_of_range_is_refused_by_name(streams: object) -> None:
    from pyhv.migration.source import MigrationOptions

    with pytest.raises(MigrationError, match=r"streams=.*1 to 16 connections"):
        MigrationOptions.from_dict({"streams": streams})
    assert MigrationOptions.from_dict({"streams": 16}).streams == 16


def test_postcopy_over_several_streams_is_refused_by_name() -> None:
    from pyhv.migration.source import MigrationOptions

    with pytest.raises(MigrationError, match=r"postcopy with streams=2: .*set streams=1"):
        MigrationOptions.from_dict({"postcopy": True, "streams": 2})
    assert MigrationOptions.from_dict({"postcopy": True, "streams": 1}).postcopy
    assert MigrationOptions.from_dict({"streams": 2}).streams == 2


def test_the_cli_refuses_postcopy_over_several_streams_by_name() -> None:
    import argparse

    from pyhv.cli.errors import CliError
    from pyhv.cli.migrate import add_migration_options, migration_options

    p = argparse.ArgumentParser()
    add_migration_options(p)
    with pytest.raises(CliError, match=r"--postcopy with --streams 2: post-copy uses one"):
        migration_options(p.parse_args(["--postcopy", "--streams", "2"]))
    assert migration_options(p.parse_args(["--streams", "2"]))["streams"] == 2
    assert migration_options(p.parse_args(["--postcopy"]))["postcopy"] is True


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), "60", True])
def test_a_post_copy_recover_timeout_out_of_range_is_refused_by_name(value: object) -> None:
    import argparse

    from pyhv.cli.errors import CliError
    from pyhv.cli.migrate import add_migration_options, migration_options
    from pyhv.migration.source import MigrationOptions

    with pytest.raises(MigrationError, match=r"recover_timeout=.*from 0 \(no recovery"):
        MigrationOptions.from_dict({"postcopy": True, "recover_timeout": value})
    assert MigrationOptions.from_dict({"recover_timeout": 0}).recover_timeout == 0
    p = argparse.ArgumentParser()
    add_migration_options(p)
    if isinstance(value, float):
        with pytest.raises(CliError, match="--recover-timeout .*from 0 \\(no recovery\\)"):
            migration_options(p.parse_args(["--postcopy", "--recover-timeout", str(value)]))
    got = migration_options(p.parse_args(["--postcopy", "--recover-timeout", "5"]))
    assert got["recover_timeout"] == 5.0


def test_postcopy_preempt_is_turned_off_from_the_cli_and_checked_in_the_options() -> None:
    import argparse

    from pyhv.cli.migrate import add_migration_options, migration_options
    from pyhv.migration.source import MigrationOptions

    p = argparse.ArgumentParser()
    add_migration_options(p)
    off = migration_options(p.parse_args(["--postcopy", "--no-postcopy-preempt"]))
    assert off["postcopy_preempt"] is False
    assert MigrationOptions.from_dict(off).postcopy_preempt is False
    hybrid = migration_options(p.parse_args(["--postcopy-after", "2", "--no-postcopy-preempt"]))
    assert hybrid["postcopy_preempt"] is False
    assert migration_options(p.parse_args(["--postcopy"]))["postcopy_preempt"] is True
    # as an API body gives it: a string is not a yes
    with pytest.raises(MigrationError, match=r"postcopy_preempt='no': give true or false"):
        MigrationOptions.from_dict({"postcopy": True, "postcopy_preempt": "no"})
