"""The data streams' final pass at the destination (docs/migration.md, "PREPARE, before the
pause"): the source ends it, empty, before PREPARE; the destination then meets those streams
at PREPARE and lets their threads end, so that the final PASS_END inside the pause waits for
no other thread. A source whose data streams end their final pass only after PREPARE (pages
still coming on them) is met at the final PASS_END as before: nothing runs before those pages
are in."""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import socket
import threading
from typing import Any

import numpy as np
import pytest

from pyhv.hypervisor.memory import MemoryRegion
from pyhv.migration import frames
from pyhv.migration import stream as st
from pyhv.migration.destination import Incoming
from pyhv.migration.stream import Frame, FrameSocket
from tests.support.vm_state import vm_state
from tests.support.wait import wait_for

pytestmark = pytest.mark.unit

TOKEN = "shared-secret-final-pass"
PAGE = 4096
PAGES = 16  # guest RAM here: 64 KiB at GPA 0


class _Ram:
    """What the receiver reads of a VM and its partition: one memfd-backed region at GPA 0."""

    vps: dict[int, Any] = {}

    def __init__(self) -> None:
        fd = os.memfd_create("pyhv-test-final-pass", os.MFD_CLOEXEC)
        os.ftruncate(fd, PAGES * PAGE)
        self.mm = mmap.mmap(fd, PAGES * PAGE)
        self._anchor = ctypes.c_char.from_buffer(self.mm)  # keeps the mapping where it is
        self.region = MemoryRegion(0, PAGES * PAGE, False, False, 0, fd, 0,
                                   ctypes.addressof(self._anchor), self.mm)  # fmt: skip
        self.gpa_space = self
        self.partition = self

    def find(self, gpa: int) -> MemoryRegion | None:
        return self.region if 0 <= gpa < self.region.end else None

    def close(self) -> None:
        del self._anchor
        self.mm.close()
        os.close(self.region.memfd)


def _data_stream_waiting(inc: Incoming) -> None:
    """Until the data stream's thread waits at the end of its last pass."""

    def waiting() -> bool:
        b = inc._pass_end
        return b is not None and b.n_waiting == 1 and inc._data_last == 1

    wait_for(waiting, 5, "the data stream's thread waiting at its final pass's end")


@pytest.mark.parametrize("data_ends", ["before-prepare", "after-prepare"])
def test_the_data_streams_final_pass_is_met_at_prepare_when_it_ended_before(
    data_ends: str,
) -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(2)
    inc = Incoming(lst, TOKEN, max_memory=1 << 30, timeout=5, accept_timeout=5)
    ram = _Ram()
    written = {0: np.zeros(PAGES, dtype=bool)}
    box: dict[str, Any] = {}

    def destination() -> None:
        try:
            inc.accept()
            box["state"] = inc._memory(ram, written)  # type: ignore[arg-type]
        except BaseException as e:  # noqa: BLE001 - returned to the test
            box["error"] = e

    t = threading.Thread(target=destination)
    t.start()
    src = FrameSocket(socket.create_connection(lst.getsockname()), timeout=5)
    data: FrameSocket | None = None
    state = dataclasses.replace(vm_state(), dynmem=None).encode()
    try:
        st.authenticate_source(src, st.token_bytes(TOKEN))
        options = frames.ConfigOptions(streams=2)
        src.send_json(Frame.CONFIG, frames.Config({}, [(0, PAGES * PAGE)], options))
        data = st.join_source(src, socket.create_connection(lst.getsockname()), 1)
        # pass 1: a page on each stream
        src.send(Frame.PAGES, b"\x11" * PAGE, count=1, addr=0)
        src.send_json(Frame.PASS_END, frames.PassEnd(1, 1))
        data.send(Frame.PAGES, b"\x22" * PAGE, count=1, addr=8 * PAGE)
        data.send_json(Frame.PASS_END, frames.PassEnd(1, 1))
        if data_ends == "before-prepare":  # as this source does: empty, ahead of PREPARE
            data.send_json(Frame.PASS_END, frames.PassEnd(2, 0, True))
            # (the destination meets it once it is there: wait until its thread waits)
            _data_stream_waiting(inc)
        src.send_json(Frame.PREPARE, frames.Empty())
        src.expect(Frame.PREPARED, frames.Empty, "prepare")
        if data_ends == "before-prepare":
            # met at PREPARE: its thread ended before the pause, not inside it
            assert inc._met_final and not any(d.is_alive() for d in inc._data_threads)
        else:
            assert not inc._met_final
        src.send(Frame.STATE, state)
        src.send(Frame.PAGES, b"\x33" * PAGE, count=1, addr=PAGE)
        if data_ends == "after-prepare":  # a page still on the data stream, after the pause
            data.send(Frame.PAGES, b"\x44" * PAGE, count=1, addr=9 * PAGE)
            data.send_json(Frame.PASS_END, frames.PassEnd(2, 1, True))
        src.send_json(Frame.PASS_END, frames.PassEnd(2, 1, True))
        t.join(10)
        assert not t.is_alive()
        assert "error" not in box, box.get("error")
        assert box["state"] is not None and inc.passes == 2
        # every page in guest RAM when the final pass returns, whichever stream carried it
        want = {0: 0x11, 1: 0x33, 8: 0x22} | ({9: 0x44} if data_ends == "after-prepare" else {})
        for page in range(PAGES):
            got = ram.mm[page * PAGE : (page + 1) * PAGE]
            assert got == bytes([want.get(page, 0)]) * PAGE, page
    finally:
        inc._end_data_streams()
        src.close()
        if data is not None:
            data.close()
        if inc.fs is not None:
            inc.fs.close()
        ram.close()
