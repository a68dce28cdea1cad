"""The post-copy source against a scripted destination on a socket pair: a page a VP waits for
goes out ahead of the background push, the push waits for the destination's restore, and a
request for memory outside the VM is refused and named (the destination is a peer, not
trusted)."""

from __future__ import annotations

import json
import socket
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pyhv.migration import frames
from pyhv.migration.postcopy import (
    PUSH_PAGES,
    PUSH_PAGES_PREEMPT,
    RUNS_PER_FRAME,
    SEND_BUFFER,
    SEND_BUFFER_PREEMPT,
    PostcopySource,
)
from pyhv.migration.recovery import reconnect_source
from pyhv.migration.stream import (
    Frame,
    FrameSocket,
    MigrationError,
    authenticate_destination,
    pack_zero_runs,
)

pytestmark = pytest.mark.simulation
PAGE = 4096
GPA = 0x100000
PAGES = 200


def _region(pages: int = PAGES) -> Any:
    """What the source reads of a RAM region: GPA, size and its bytes (each page numbered)."""
    mm = bytearray(pages * PAGE)
    for i in range(pages):
        mm[i * PAGE] = i % 255 + 1
    return SimpleNamespace(gpa=GPA, size=len(mm), end=GPA + len(mm), pages=pages, mm=mm)


def _sealed(encrypt: bool = True) -> tuple[FrameSocket, FrameSocket]:
    """Both ends of a connection, sealed as after the handshake."""
    a, b = socket.socketpair()
    fa, fb = FrameSocket(a, timeout=10), FrameSocket(b, timeout=10, peer="source")
    k1, k2 = bytes(range(32)), bytes(range(32, 64))
    fa.seal(k1, k2, encrypt=encrypt)
    fb.seal(k2, k1, encrypt=encrypt)
    return fa, fb


def _pair() -> tuple[PostcopySource, FrameSocket]:
    fa, fb = _sealed()
    return PostcopySource(fa, [_region()], [np.ones(PAGES, dtype=bool)]), fb


def test_a_waited_for_page_goes_ahead_of_the_push_which_waits_for_the_restore() -> None:
    src, dst = _pair()
    last = GPA + (PAGES - 1) * PAGE
    dst.send(Frame.REQUEST, pack_zero_runs([(last, 1)]), count=1)
    dst.send_json(Frame.RESTORED, frames.Empty())
    commits: list[bool] = []
    server = threading.Thread(
        target=src.serve,
        args=(lambda: (commits.append(True), src.fs.send_json(Frame.COMMIT, frames.Empty())), 1e18),
        daemon=True,
    )
    server.start()
    seen: list[tuple[Frame, int, int]] = []
    pages = 0
    while pages < PAGES:
        ftype, _flags, count, addr, payload = dst.recv()
        seen.append((ftype, addr, count))
        if ftype is Frame.PAGES:
            if addr == last and pages == 0:
                assert payload[0] == PAGES  # the page's own bytes
            pages += count
    first_pages = [s for s in seen if s[0] is Frame.PAGES]
    assert first_pages[0][1] == last  # the urgent page before any pushed one
    assert seen.index((Frame.COMMIT, 0, 0)) < seen.index(first_pages[1])  # push after COMMIT
    dst.send_json(Frame.RESUMED, frames.Resumed(0.0))
    done = frames.PostcopyDone("0" * 16, 1, 1, 1.0, 1.0, 1.0, {})
    dst.send_json(Frame.POSTCOPY_DONE, done)
    server.join(10)
    assert not server.is_alive() and src.done == done and commits == [True]
    assert src.urgent_pages == 1 and src.pushed_pages == PAGES - 1  # never sent twice


@pytest.mark.parametrize("preempt", [True, False])
def test_the_push_goes_in_larger_frames_while_the_urgent_channel_carries_the_requests(
    preempt: bool,
) -> None:
    pages = 3 * PUSH_PAGES_PREEMPT
    fa, dst = _sealed()
    channel, _far = _sealed()
    region = _region(pages)
    src = PostcopySource(
        fa, [region], [np.ones(pages, dtype=bool)], preempt=(lambda: channel) if preempt else None
    )
    src.ready()
    assert (src.urgent is channel) == preempt
    dst.send_json(Frame.RESTORED, frames.Empty())
    server = threading.Thread(
        target=src.serve, args=(lambda: src.fs.send_json(Frame.COMMIT, frames.Empty()), 1e18)
    )
    server.start()
    sizes: list[int] = []
    got = bytearray(pages * PAGE)
    while sum(sizes) < pages:
        ftype, _flags, count, addr, payload = dst.recv()
        if ftype is Frame.PAGES:
            sizes.append(count)
            got[addr - GPA : addr - GPA + len(payload)] = payload
    assert max(sizes) == (PUSH_PAGES_PREEMPT if preempt else PUSH_PAGES)
    assert got == region.mm  # each page's own bytes, sent from where they lie
    buffer = fa.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert buffer >= SEND_BUFFER_PREEMPT if preempt else buffer <= 2 * SEND_BUFFER
    dst.send_json(Frame.RESUMED, frames.Resumed(0.0))
    dst.send_json(Frame.POSTCOPY_DONE, frames.PostcopyDone("0" * 16, 0, 0, 0.0, 0.0, 0.0, {}))
    server.join(10)
    src.close()
    assert not server.is_alive() and src.pushed_pages == pages


@pytest.mark.parametrize(
    "run", [(0x900000, 1), (GPA + 3, 1), (GPA + (PAGES - 1) * PAGE, 2), (GPA, 0)]
)
def test_a_request_outside_the_vms_ram_is_refused_and_named(run: tuple[int, int]) -> None:
    src, dst = _pair()
    dst.send(Frame.REQUEST, pack_zero_runs([run]), count=1)
    with pytest.raises(MigrationError, match="outside the VM's RAM"):
        src.serve(lambda: None, 1e18)


def test_a_request_of_more_runs_than_a_frame_holds_is_refused() -> None:
    src, dst = _pair()
    runs = [(GPA, 1)] * (RUNS_PER_FRAME + 1)
    dst.send(Frame.REQUEST, pack_zero_runs(runs), count=len(runs))
    with pytest.raises(MigrationError, match=f"a REQUEST of {RUNS_PER_FRAME + 1} runs"):
        src.serve(lambda: None, 1e18)


def test_a_resume_answered_by_more_missing_runs_than_ram_has_pages_is_refused() -> None:
    """The destination's MISSING runs are counted before they are kept (a peer, not trusted)."""
    listener = socket.create_server(("127.0.0.1", 0))
    token = bytes(32)

    def destination() -> None:
        conn, _ = listener.accept()
        fs = FrameSocket(conn, timeout=10, peer="source")
        try:
            authenticate_destination(fs, token)
            fs.recv()  # RESUME
            fs.send(Frame.MISSING, pack_zero_runs([(GPA, 1)] * 3), count=3)
            fs.recv()  # until the source hangs up
        except (OSError, MigrationError):
            pass
        finally:
            fs.close()

    peer = threading.Thread(target=destination, daemon=True)
    peer.start()
    try:
        with pytest.raises(
            MigrationError, match=r"misses more runs \(3\) than RAM has pages \(2\)"
        ):
            reconnect_source(
                listener.getsockname(), token, "0" * 32,
                encrypt=False, bandwidth=0, timeout=10, max_runs=2,
            )  # fmt: skip
    finally:
        peer.join(10)
        listener.close()
    assert not peer.is_alive()


@pytest.mark.parametrize(
    ("missing", "why"),
    [
        ([(GPA + 150 * PAGE, 1)], "which it never needed"),  # outside the NEED set
        ([(0x900000, 1)], "outside the VM's RAM"),
        ([(GPA + 99 * PAGE, 2)], "which it never needed"),  # runs past the NEED set
    ],
)
def test_after_a_cut_link_a_missing_set_the_source_never_sent_is_refused(
    missing: list[tuple[int, int]], why: str
) -> None:
    """A destination that resumes a post-copy names what it still lacks: only pages of the
    NEED set it was given, inside RAM (a peer, not trusted)."""
    ours, theirs = _sealed()
    need = np.zeros(PAGES, dtype=bool)
    need[:100] = True
    attempts: list[int] = []

    def reconnect() -> tuple[FrameSocket, list[tuple[int, int]], Any]:
        attempts.append(1)
        fs, _peer = _sealed()
        return fs, missing, frames.ResumeAck(sum(n for _g, n in missing), len(missing))

    src = PostcopySource(ours, [_region()], [need], reconnect=reconnect, recover_timeout=5)
    theirs.send_json(Frame.RESTORED, frames.Empty())
    commits: list[bool] = []

    def commit() -> None:
        commits.append(True)
        theirs.close(reset=True)  # the link is cut once the VM runs there

    with pytest.raises(MigrationError, match=why):
        src.serve(commit, 1e18)
    assert commits == [True] and attempts == [1]  # reconnected once, then refused it


def _with_urgent() -> tuple[PostcopySource, FrameSocket, FrameSocket]:
    """A source whose urgent channel (post-copy preempt) opens at once: (source, the
    destination's end of the link, its end of the urgent channel)."""
    fa, fb = _sealed()
    ua, ub = _sealed()
    src = PostcopySource(fa, [_region()], [np.ones(PAGES, dtype=bool)], preempt=lambda: ua)
    return src, fb, ub


@pytest.mark.parametrize("urgent", [False, True], ids=["link", "urgent channel"])
@pytest.mark.parametrize(
    "payload, words",
    [
        (pack_zero_runs([(0x900000, 1)]), "outside the VM's RAM"),
        (b"\0" * 15, "not a list of 16-byte runs"),
        (pack_zero_runs([(GPA, 1)] * (RUNS_PER_FRAME + 1)), "a REQUEST of"),
    ],
    ids=["outside RAM", "torn", "too many runs"],
)
def test_a_bad_request_is_refused_and_counted_the_same_on_the_link_and_the_urgent_channel(
    urgent: bool, payload: bytes, words: str
) -> None:
    src, link, channel = _with_urgent()
    (channel if urgent else link).send(Frame.REQUEST, payload, count=1)
    with pytest.raises(MigrationError, match=words):
        src.serve(lambda: None, 1e18)
    assert src.frames_refused == 1 and src.requests == 0


def test_a_good_request_on_the_urgent_channel_is_answered_there() -> None:
    src, link, channel = _with_urgent()
    last = GPA + (PAGES - 1) * PAGE
    channel.send(Frame.REQUEST, pack_zero_runs([(last, 1)]), count=1)
    server = threading.Thread(target=src.serve, args=(lambda: None, 1e18), daemon=True)
    server.start()
    ftype, _flags, count, addr, payload = channel.recv()
    assert (ftype, count, addr, payload[0]) == (Frame.PAGES, 1, last, PAGES)
    link.send_json(Frame.RESUMED, frames.Resumed(0.0))
    link.send_json(Frame.POSTCOPY_DONE, frames.PostcopyDone("0" * 16, 1, 1, 1.0, 1.0, 1.0, {}))
    server.join(10)
    assert not server.is_alive() and src.channel_pages == 1 and src.frames_refused == 0


def _done_with(threads: dict[str, float]) -> bytes:
    """A POSTCOPY_DONE body with these per-thread blocktimes, whatever their bounds."""
    body = json.loads(frames.encode(frames.PostcopyDone("0" * 16, 1, 1, 1.0, 1.0, 1.0, {})))
    return json.dumps(body | {"thread_blocktime_ms": threads}).encode()


@pytest.mark.parametrize(
    "threads, words",
    [
        ({f"tid {i}": 1.0 for i in range(frames.MAX_BLOCKTIME_THREADS + 1)}, "length"),
        ({"x" * (frames.MAX_THREAD_NAME + 1): 1.0}, "length"),
        ({"vp0": -1.0}, ">= 0"),
    ],
    ids=["too many threads", "a name too long", "a negative wait"],
)
def test_a_postcopy_done_with_blocktimes_out_of_bounds_is_refused_and_counted(
    threads: dict[str, float], words: str
) -> None:
    src, dst = _pair()
    dst.send(Frame.POSTCOPY_DONE, _done_with(threads))
    with pytest.raises(MigrationError, match=f"POSTCOPY_DONE.*{words}"):
        src.serve(lambda: None, 1e18)
    assert src.frames_refused == 1 and src.done is None


def test_a_postcopy_done_at_the_bounds_is_taken() -> None:
    threads = {f"vp{i}": 1.0 for i in range(frames.MAX_BLOCKTIME_THREADS - 1)}
    threads["x" * frames.MAX_THREAD_NAME] = 0.0
    src, dst = _pair()
    dst.send(Frame.POSTCOPY_DONE, _done_with(threads))
    dst.send_json(Frame.RESUMED, frames.Resumed(0.0))
    src.serve(lambda: None, 1e18)
    assert src.done is not None and len(src.done.thread_blocktime_ms) == len(threads)
