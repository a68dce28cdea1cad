"""The post-copy destination's receiver on real userfaultfd-registered memory, fed by a scripted
source: frames larger than one install slice (INSTALL_PAGES) and of differing sizes through the
one reused receive buffer land intact, the RAM digest adds up, and each waiter's blocktime is
taken exactly once (only the pages somebody asked for are looked at)."""

from __future__ import annotations

import ctypes
import mmap
import os
import socket
import time
from types import SimpleNamespace

import numpy as np
import pytest

from pyhv.memory.userfault import Userfault
from pyhv.migration import frames
from pyhv.migration.postcopy import INSTALL_PAGES, PostcopyDestination, digest, hexdigest
from pyhv.migration.stream import Frame, FrameSocket
from tests.support.wait import wait_for

pytestmark = pytest.mark.unit
PAGE = 4096
GPA = 0x100000
PAGES = 5 * INSTALL_PAGES


def test_large_frames_through_one_buffer_land_intact_and_each_waiter_is_timed_once() -> None:
    fd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, PAGES * PAGE)
    mm = mmap.mmap(fd, PAGES * PAGE)
    host = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    region = SimpleNamespace(
        gpa=GPA, size=len(mm), end=GPA + len(mm), pages=PAGES, mm=mm, host_address=host
    )
    a, b = socket.socketpair()
    src, dst = FrameSocket(a, timeout=10), FrameSocket(b, timeout=10, peer="source")
    src.seal(bytes(range(32)), bytes(range(32, 64)), encrypt=False)
    dst.seal(bytes(range(32, 64)), bytes(range(32)), encrypt=False)
    d = PostcopyDestination(dst)
    d.regions, d.verify = [region], True  # type: ignore[list-item]
    d.need, d.present = [np.ones(PAGES, dtype=bool)], [np.zeros(PAGES, dtype=bool)]
    d.remaining = PAGES
    d.uf = Userfault(None)
    d.uf.register(host, len(mm))
    asked = time.monotonic()
    for page, who in [(INSTALL_PAGES + 3, "vp0"), (4 * INSTALL_PAGES + 1, "vp1")]:
        d._requested[(0, page)] = asked
        d._waiters[(0, page)] = [(who, asked)]
    d._waiters[(0, 4 * INSTALL_PAGES + 1)].append(("vp0", asked))

    data = np.random.default_rng(7).integers(1, 255, PAGES * PAGE, dtype=np.uint8).tobytes()
    d._receiver(dst)
    # 3 slices and a bit, then a smaller frame into the same buffer, then a larger one
    for first, n in [
        (0, 3 * INSTALL_PAGES + 5),
        (3 * INSTALL_PAGES + 5, 7),
        (3 * INSTALL_PAGES + 12, PAGES - 3 * INSTALL_PAGES - 12),
    ]:
        src.send(
            Frame.PAGES, data[first * PAGE : (first + n) * PAGE], count=n, addr=GPA + first * PAGE
        )
    ftype, _flags, _count, _addr, payload = src.recv()  # every page in: POSTCOPY_DONE
    assert ftype is Frame.POSTCOPY_DONE
    done = frames.decode(payload, frames.PostcopyDone, "POSTCOPY_DONE")
    assert d.remaining == 0 and d.present[0].all() and not d._requested and not d._waiters
    assert bytes(mm) == data
    assert done.checksum == hexdigest(d.checksum) == hexdigest(digest(GPA, data))
    assert len(d.blocktime_ms) == 3 and min(d.blocktime_ms) >= 0
    assert sorted(d.thread_ms) == ["vp0", "vp1"]
    src.close()
    wait_for(lambda: d.uf is not None and d.uf._closed, 10, "the userfaultfd closed")
    mm.close()
    os.close(fd)
