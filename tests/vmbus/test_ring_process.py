"""Host and guest in two processes over one shared mapping: the guest process echoes what the
host sends, each side signalling the other only as the ring rules say (no polling)."""

from __future__ import annotations

import mmap
import os
import select
import time

import pytest

from pyhv.vmbus.channel import Channel
from pyhv.vmbus.packet import Packet
from pyhv.vmbus.ring import PAGE_SIZE
from tests.support.guest_ring import GuestRing

pytestmark = pytest.mark.simulation

SPLIT = 2  # one data page per direction: the rings fill up and wrap often
COUNT = 400


def _guest(mem: memoryview, to_guest: int, to_host: int) -> int:
    out = GuestRing(mem[: SPLIT * PAGE_SIZE])
    inb = GuestRing(mem[SPLIT * PAGE_SIZE :])
    while True:
        pkt = inb.read()
        if pkt is None:
            if not select.select([to_guest], [], [], 10)[0]:
                return 2  # a lost wakeup
            os.eventfd_read(to_guest)
            continue
        _, _, tid, payload = pkt
        if payload.startswith(b"stop"):
            return 0
        while True:
            try:
                if out.write(payload, tid):
                    os.eventfd_write(to_host, 1)
                break
            except BlockingIOError:
                time.sleep(0.0005)  # this test guest does not use pending_send_sz


def test_a_guest_process_echoes_host_packets_over_shared_memory() -> None:
    m = mmap.mmap(-1, 2 * SPLIT * PAGE_SIZE)  # MAP_SHARED: the child sees the same pages
    mem = memoryview(m)
    GuestRing(mem[: SPLIT * PAGE_SIZE], init=True)
    GuestRing(mem[SPLIT * PAGE_SIZE :], init=True)
    to_guest, to_host = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            code = _guest(mem, to_guest, to_host)
        except BaseException as e:
            os.write(2, f"guest failed: {e!r}\n".encode())
        finally:
            os._exit(code)
    try:
        echoes: list[Packet] = []
        ch = Channel(mem, SPLIT, to_guest, on_packet=echoes.append)
        sent = 0
        while len(echoes) < COUNT:
            while sent < COUNT and ch.try_send(sent.to_bytes(4, "little") * (1 + sent % 50), sent):
                sent += 1
            ch.poll()
            assert ch.close_reason is None, ch.close_reason
            if len(echoes) < COUNT and not ch.reader.available():
                assert select.select([to_host], [], [], 10)[0], "the guest never signalled"
                os.eventfd_read(to_host)
        while not ch.try_send(b"stop"):
            time.sleep(0.001)
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
        assert [e.trans_id for e in echoes] == list(range(COUNT))
        for e in echoes:
            n = e.trans_id
            assert e.payload[: 4 * (1 + n % 50)] == n.to_bytes(4, "little") * (1 + n % 50)
        assert ch.writer.full > 0  # the ring really filled up on the way
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(to_guest)
        os.close(to_host)
