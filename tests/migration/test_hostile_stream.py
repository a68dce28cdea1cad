"""What the destination does with a hostile source (the stream is untrusted network input):
values that would allocate, or slip past a check, are refused with a MigrationError; and what
either side does with a frame a man in the middle altered after the handshake (refused, named,
counted)."""

from __future__ import annotations

import dataclasses
import socket
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest
import zstandard

from pyhv.migration import frames
from pyhv.migration import stream as st
from pyhv.migration.destination import Incoming
from pyhv.migration.stream import Frame, FrameSocket, MigrationError
from tests.support.hostile import StreamRelay
from tests.support.vm_state import vm_state

pytestmark = pytest.mark.unit

TOKEN = "shared-secret-1"


def _incoming() -> Incoming:
    lst = socket.socket()
    inc = Incoming(lst, TOKEN, max_memory=1 << 30)
    lst.close()
    return inc


def test_a_compressed_frame_declaring_more_than_its_pages_is_refused_before_allocating() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 2 KiB declaring 64 MiB
    assert len(bomb) < 8192
    target = memoryview(bytearray(4096))
    tracemalloc.start()
    try:
        with pytest.raises(MigrationError, match="declares 67108864 bytes, not 4096"):
            _incoming()._decompress(bytearray(bomb), target)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_compressed_frame_with_a_garbled_header_is_refused() -> None:
    with pytest.raises(MigrationError, match="compressed page frame"):
        _incoming()._decompress(bytearray(b"not zstd at all"), memoryview(bytearray(4096)))


def test_a_compressed_frame_of_the_right_size_still_fills_its_pages() -> None:
    data = bytes(range(256)) * 32
    target = memoryview(bytearray(8192))
    _incoming()._decompress(bytearray(zstandard.ZstdCompressor().compress(data)), target)
    assert bytes(target) == data
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    target = memoryview(bytearray(8192))
    _incoming()._decompress(bytearray(unsized), target)
    assert bytes(target) == data


def _against_source(
    work: Callable[[Incoming], object],
    source: Callable[[FrameSocket], object],
    setup: Callable[[Incoming], object] = lambda inc: None,
) -> BaseException | None:
    """Run `work` on a listening destination (after `setup`) against a source that
    authenticates and then does `source`; the destination's error (None if it had none)."""
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    inc = Incoming(lst, TOKEN, max_memory=1 << 30, timeout=5, accept_timeout=5)
    setup(inc)
    err: list[BaseException | None] = [None]

    def destination() -> None:
        try:
            work(inc)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            err[0] = e

    t = threading.Thread(target=destination)
    t.start()
    src = FrameSocket(socket.create_connection(lst.getsockname()), timeout=5)
    try:
        st.authenticate_source(src, st.token_bytes(TOKEN))
        source(src)
        t.join(10)
    finally:
        src.close()
        if inc.fs is not None:
            inc.fs.close()
    return err[0]


def _accept_config(msg: dict[str, Any]) -> BaseException | None:
    """The destination's accept() against a source that sends `msg` as its CONFIG frame."""
    return _against_source(lambda inc: inc.accept(), lambda src: src.send_json(Frame.CONFIG, msg))


def test_a_negative_region_size_cannot_slip_a_config_under_the_memory_limit() -> None:
    err = _accept_config({"config": {}, "regions": [[0, 1 << 40], [1 << 40, -(1 << 40)]]})
    assert isinstance(err, MigrationError) and "RAM region" in str(err)


@pytest.mark.parametrize(
    "regions",
    [[[0]], [[0, 4096, 1]], ["ab"], [[0, "4096"]], [[0, 4096.0]], [[-4096, 4096]], [[1, 4096]]],
)
def test_a_config_with_a_malformed_region_is_refused(regions: list[Any]) -> None:
    err = _accept_config({"config": {}, "regions": regions})
    assert isinstance(err, MigrationError) and "RAM region" in str(err)


def test_a_config_whose_options_are_not_an_object_is_refused() -> None:
    err = _accept_config({"config": {}, "regions": [[0, 1 << 20]], "options": [1]})
    assert isinstance(err, MigrationError) and "options" in str(err)


def test_a_well_formed_config_within_the_memory_limit_is_accepted() -> None:
    assert _accept_config({"config": {}, "regions": [[0, 1 << 20], [1 << 32, 1 << 20]]}) is None


def _through_relay(
    tamper: tuple[str, Frame], recompute_check: bool
) -> tuple[FrameSocket, FrameSocket, StreamRelay]:
    """A source and a destination FrameSocket, authenticated through a man in the middle."""
    lst = socket.create_server(("127.0.0.1", 0))
    relay = StreamRelay(lst.getsockname()[:2], tamper, recompute_check)
    box: list[Any] = []

    def destination() -> None:
        sock, _ = lst.accept()
        fs = FrameSocket(sock, timeout=5, peer="source")
        st.authenticate_destination(fs, st.token_bytes(TOKEN))
        box.append(fs)

    t = threading.Thread(target=destination)
    t.start()
    src = FrameSocket(socket.create_connection(relay.address), timeout=5, peer="destination")
    st.authenticate_source(src, st.token_bytes(TOKEN))
    t.join(10)
    lst.close()
    return src, box[0], relay


@pytest.mark.parametrize("recompute_check", [True, False], ids=["xxh3-recomputed", "as-is"])
def test_a_page_frame_altered_on_the_way_is_refused_by_the_destination(
    recompute_check: bool,
) -> None:
    src, dst, relay = _through_relay(("to_destination", Frame.PAGES), recompute_check)
    src.send(Frame.PAGES, b"\x33" * 8192, count=2, addr=0x10000)
    with pytest.raises(MigrationError) as e:
        dst.recv()
    assert relay.tampered.is_set()
    assert "PAGES frame #1 (8192 bytes at 0x10000) from the source failed authentication" in str(
        e.value
    )
    assert dst.frames_refused == 1
    for c in (src, dst, relay):
        c.close()


@pytest.mark.parametrize("recompute_check", [True, False], ids=["xxh3-recomputed", "as-is"])
def test_a_control_frame_altered_on_the_way_is_refused_by_the_source(
    recompute_check: bool,
) -> None:
    src, dst, relay = _through_relay(("to_source", Frame.RESTORED), recompute_check)
    dst.send_json(Frame.RESTORED, frames.Empty())
    with pytest.raises(MigrationError, match="RESTORED frame #2 .* from the destination failed"):
        src.expect(Frame.RESTORED, frames.Empty)
    assert src.frames_refused == 1
    for c in (src, dst, relay):
        c.close()


class _NoVps:  # the partition as _first_stream sees it before the state: no VP to raise
    vps: dict[int, Any] = {}


def _first_stream_only(inc: Incoming) -> None:
    """The destination's first stream alone, from the handshake on (no VM behind it)."""
    inc.accept()
    assert inc.fs is not None
    inc._first_stream(inc.fs, _NoVps(), {})


def test_a_second_prepare_is_refused_and_the_first_is_answered() -> None:
    """PREPARE asks the destination to get ready for the pause (its owner's word, real-time
    priority): answered with PREPARED once; a source that sends it again is refused."""
    asked: list[int] = []

    def source(src: FrameSocket) -> None:
        src.send_json(Frame.CONFIG, frames.Config({}, [(0, 1 << 20)]))
        src.send_json(Frame.PREPARE, frames.Empty())
        src.expect(Frame.PREPARED, frames.Empty, "prepare")
        src.send_json(Frame.PREPARE, frames.Empty())

    def setup(inc: Incoming) -> None:
        inc.authorize = lambda: asked.append(1)

    err = _against_source(_first_stream_only, source, setup)
    assert asked == [1]  # the owner was asked once
    assert isinstance(err, MigrationError) and "PREPARE twice" in str(err), err


@pytest.mark.parametrize(
    ("after", "pattern"),
    [(Frame.STATE, "STATE twice"), (Frame.PREPARE, "PREPARE frame after the state")],
)
def test_after_a_state_ahead_of_the_last_pages_only_the_pages_may_follow(
    after: Frame, pattern: str
) -> None:
    """After PREPARE the state comes ahead of the last pages: a second STATE, or any frame but
    the pages, PASS_END and ABORT, is refused (nothing runs: the final PASS_END never came)."""

    restored: list[object] = []

    def destination(inc: Incoming) -> None:
        inc.accept()
        assert inc.fs is not None
        inc._restore_early = restored.append  # what receive() sets: the restore into the VM
        inc._first_stream(inc.fs, _NoVps(), {})

    state = dataclasses.replace(vm_state(), dynmem=None).encode()  # (DM's: after the pages)

    def source(src: FrameSocket) -> None:
        src.send_json(Frame.CONFIG, frames.Config({}, [(0, 1 << 20)]))
        src.send_json(Frame.PREPARE, frames.Empty())
        src.expect(Frame.PREPARED, frames.Empty, "prepare")
        src.send(Frame.STATE, state)
        src.send(after, state if after is Frame.STATE else b"{}")

    err = _against_source(destination, source, lambda inc: None)
    assert isinstance(err, MigrationError) and pattern in str(err), err
    assert len(restored) == 1  # restored as it came, once


@pytest.mark.parametrize(
    ("frame", "body"),
    [(Frame.PASS_END, {"pass": -1}), (Frame.PREPARE, {"unexpected": 1})],
)
def test_a_malformed_pass_end_or_prepare_on_the_first_stream_is_refused(
    frame: Frame, body: dict[str, Any]
) -> None:
    """The first stream checks every control frame's body, as the data streams do."""

    def source(src: FrameSocket) -> None:
        src.send_json(Frame.CONFIG, frames.Config({}, [(0, 1 << 20)]))
        src.send_json(frame, body)

    err = _against_source(_first_stream_only, source)
    assert isinstance(err, MigrationError) and f"the {frame.name} frame is refused" in str(err), err
