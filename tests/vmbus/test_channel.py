"""A channel: two rings in one guest-memory area, signals both ways."""

from __future__ import annotations

import mmap
import os

import pytest

from pyhv.vmbus.channel import Channel, ChannelState
from pyhv.vmbus.packet import Packet
from pyhv.vmbus.ring import PAGE_SIZE
from tests.support.guest_ring import WRITE, GuestRing

pytestmark = pytest.mark.simulation

PAGES = 8  # 4 pages per direction
SPLIT = 4


def area() -> tuple[mmap.mmap, memoryview, GuestRing, GuestRing]:
    m = mmap.mmap(-1, PAGES * PAGE_SIZE)
    mv = memoryview(m)
    out = GuestRing(mv[: SPLIT * PAGE_SIZE], init=True)  # guest -> host
    inb = GuestRing(mv[SPLIT * PAGE_SIZE :], init=True)  # host -> guest
    return m, mv, out, inb


def test_the_guest_rings_the_doorbell_and_the_host_serves_its_packets() -> None:
    m, mv, out, inb = area()
    got: list[Packet] = []
    ch = Channel(mv, SPLIT, on_packet=got.append)
    out.write(b"one", 1)
    out.write(b"two", 2)
    assert ch.doorbell() == 2
    assert [p.trans_id for p in got] == [1, 2]


def test_the_host_interrupts_the_guest_through_an_irqfd() -> None:
    m, mv, out, inb = area()
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ch = Channel(mv, SPLIT, efd)
        assert ch.try_send(b"hi", 5)
        assert os.eventfd_read(efd) == 1
        assert inb.read() == (6, 0, 5, b"hi\0\0\0\0\0\0")
    finally:
        os.close(efd)


def test_the_doorbell_can_be_an_ioeventfd() -> None:
    m, mv, out, inb = area()
    got: list[Packet] = []
    ch = Channel(mv, SPLIT, on_packet=got.append)
    ch.doorbell_fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        out.write(b"x", 9)
        os.eventfd_write(ch.doorbell_fd, 1)  # what KVM does when the guest writes the port
        assert ch.on_doorbell_fd() == 1 and got[0].trans_id == 9
        assert ch.on_doorbell_fd() == 0  # spurious: nothing to read, no harm
    finally:
        os.close(ch.doorbell_fd)


def test_a_corrupt_ring_closes_the_channel_with_the_reason() -> None:
    m, mv, out, inb = area()
    reasons: list[str] = []
    ch = Channel(mv, SPLIT, on_close=reasons.append)
    out.set(WRITE, 3)
    assert ch.poll() == 0
    assert ch.state is ChannelState.CLOSED and "write_index" in reasons[0]
    assert not ch.try_send(b"x")
    out.release()
    inb.release()
    mv.release()
    m.close()  # the channel let go of guest memory: the mapping can go


def test_a_ring_area_split_badly_is_refused() -> None:
    m = mmap.mmap(-1, PAGES * PAGE_SIZE)
    with pytest.raises(ValueError, match="split"):
        Channel(memoryview(m), 1)
    with pytest.raises(ValueError, match="split"):
        Channel(memoryview(m), PAGES - 1)
