"""The VMBus ring, host side, against a guest side written from the reference."""

from __future__ import annotations

import mmap
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhv.vmbus.packet import DESCRIPTOR, PacketType
from pyhv.vmbus.ring import PAGE_SIZE, RingControl, RingCorrupt, RingReader, RingWriter
from tests.support.guest_ring import MASK, PENDING, READ, WRITE, GuestRing

pytestmark = pytest.mark.simulation

DATA_PAGES = 4


def make_ring(pages: int = DATA_PAGES) -> tuple[mmap.mmap, memoryview]:
    m = mmap.mmap(-1, PAGE_SIZE * (1 + pages))
    return m, memoryview(m)


def test_control_page_layout_matches_struct_hv_ring_buffer() -> None:
    m, mv = make_ring()
    ctl = RingControl.from_buffer(mv)
    ctl.write_index, ctl.read_index, ctl.interrupt_mask, ctl.pending_send_sz = 8, 16, 1, 40
    ctl.feature_bits = 1
    assert struct.unpack_from("<IIII", mv, 0) == (8, 16, 1, 40)
    assert struct.unpack_from("<I", mv, 64) == (1,)
    del ctl


def test_a_guest_packet_reaches_the_host_with_its_transaction_id() -> None:
    m, mv = make_ring()
    guest = GuestRing(mv, init=True)
    host = RingReader(mv)
    assert guest.write(b"hello", trans_id=42) is True
    pkt = host.read_packet()
    assert pkt is not None
    assert (pkt.type, pkt.trans_id, pkt.flags) == (PacketType.DATA_INBAND, 42, 0)
    assert pkt.payload == b"hello\0\0\0"  # padded to 8 bytes; protocols carry their own length
    assert guest.get(READ) == guest.get(WRITE) == 32
    assert host.read_packet() is None


def test_host_packets_carry_descriptor_pad_and_trailer_as_vmbus_sendpacket_writes_them() -> None:
    m, mv = make_ring()
    guest = GuestRing(mv, init=True)
    signals: list[int] = []
    host = RingWriter(mv, lambda: signals.append(1))
    assert host.try_write(b"abc", trans_id=7, flags=1)
    assert DESCRIPTOR.unpack_from(mv, PAGE_SIZE) == (6, 2, 3, 1, 7)
    assert bytes(mv[PAGE_SIZE + 16 : PAGE_SIZE + 24]) == b"abc\0\0\0\0\0"
    assert struct.unpack_from("<Q", mv, PAGE_SIZE + 24) == (0,)
    assert guest.read() == (6, 1, 7, b"abc\0\0\0\0\0")
    assert signals == [1]


def test_the_host_signals_only_when_the_ring_goes_from_empty_to_non_empty() -> None:
    m, mv = make_ring()
    guest = GuestRing(mv, init=True)
    signals: list[int] = []
    host = RingWriter(mv, lambda: signals.append(1))
    host.try_write(b"1")
    host.try_write(b"2")
    assert len(signals) == 1
    guest.read()
    guest.read()
    host.try_write(b"3")
    assert len(signals) == 2


def test_the_host_does_not_signal_while_the_guest_masks_interrupts() -> None:
    m, mv = make_ring()
    guest = GuestRing(mv, init=True)
    guest.set(MASK, 1)
    signals: list[int] = []
    host = RingWriter(mv, lambda: signals.append(1))
    host.try_write(b"x")
    assert signals == [] and guest.read() is not None


def test_the_ring_is_never_completely_full_and_pending_send_sz_asks_for_room() -> None:
    m, mv = make_ring(1)
    guest = GuestRing(mv, init=True)
    host = RingWriter(mv)
    payload = bytes(1000)
    written = 0
    while host.try_write(payload):
        written += 1
    assert written == 3  # a 4th packet of 1024 bytes would fill the 4096-byte area exactly
    assert guest.get(PENDING) == 16 + 1000 + 8
    assert host.full == 1
    guest.read()
    assert host.try_write(payload)
    assert guest.get(PENDING) == 0


def test_the_host_signals_a_waiting_guest_only_when_enough_room_appears() -> None:
    m, mv = make_ring(1)
    guest = GuestRing(mv, init=True)
    signals: list[int] = []
    host = RingReader(mv, lambda: signals.append(1))
    for _ in range(3):
        guest.write(bytes(1000))
    with pytest.raises(BlockingIOError):
        guest.write(bytes(1000))
    guest.set(PENDING, 2048)  # the guest waits for 2 KiB
    host.read_packets(1)  # 1024 free + 1024 read = 2048: not more than pending yet
    assert signals == []
    host.read_packets(1)
    assert signals == [1]
    host.read_packets(1)
    assert signals == [1]  # already enough before: no second wakeup


def test_packets_wrap_around_the_end_of_the_data_area() -> None:
    m, mv = make_ring(1)
    guest = GuestRing(mv, init=True)
    reader = RingReader(mv)
    for i in range(40):
        payload = bytes([i]) * (300 + i * 7)
        guest.write(payload, trans_id=i)
        pkt = reader.read_packet()
        assert pkt is not None and pkt.trans_id == i
        assert pkt.payload[: len(payload)] == payload
    m2, mv2 = make_ring(1)
    g2 = GuestRing(mv2, init=True)
    writer = RingWriter(mv2)
    for i in range(40):
        payload = bytes([i]) * (300 + i * 7)
        assert writer.try_write(payload, trans_id=i)
        ptype, flags, tid, got = g2.read()  # type: ignore[misc]
        assert tid == i and got[: len(payload)] == payload


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [(WRITE, 4 * PAGE_SIZE, "write_index"), (WRITE, 12, "write_index")],
)
def test_a_write_index_out_of_range_or_unaligned_is_refused(
    field: int, value: int, what: str
) -> None:
    m, mv = make_ring()
    host = RingReader(mv)
    GuestRing(mv).set(field, value)
    with pytest.raises(RingCorrupt) as e:
        host.read_packets()
    assert e.value.field == what and host.bad_indices == 1


def test_a_packet_longer_than_the_published_bytes_is_refused() -> None:
    m, mv = make_ring()
    guest = GuestRing(mv, init=True)
    host = RingReader(mv)
    guest.write(b"12345678")
    DESCRIPTOR.pack_into(mv, PAGE_SIZE, 6, 2, 100, 0, 0)
    with pytest.raises(RingCorrupt) as e:
        host.read_packets()
    assert e.value.field == "len8" and host.bad_packets == 1


def test_a_payload_offset_outside_the_packet_is_refused() -> None:
    m, mv = make_ring()
    guest = GuestRing(mv, init=True)
    host = RingReader(mv)
    guest.write(b"12345678")
    DESCRIPTOR.pack_into(mv, PAGE_SIZE, 6, 9, 3, 0, 0)
    with pytest.raises(RingCorrupt) as e:
        host.read_packets()
    assert e.value.field == "offset8"


def test_a_packet_of_unknown_type_is_skipped_and_counted() -> None:
    m, mv = make_ring()
    guest = GuestRing(mv, init=True)
    host = RingReader(mv)
    guest.write(b"bad", ptype=0x77)
    guest.write(b"good")
    pkts = host.read_packets()
    assert [p.payload[:4] for p in pkts] == [b"good"]
    assert host.bad_packets == 1


def test_a_guest_read_index_out_of_range_stops_the_host_writer() -> None:
    m, mv = make_ring()
    host = RingWriter(mv)
    GuestRing(mv).set(READ, 5)
    with pytest.raises(RingCorrupt):
        host.try_write(b"x")


def test_a_payload_that_can_never_fit_is_a_host_error() -> None:
    m, mv = make_ring(1)
    host = RingWriter(mv)
    with pytest.raises(ValueError):
        host.try_write(bytes(host.max_payload() + 1))
    assert host.try_write(bytes(host.max_payload()))


def test_indices_in_guest_memory_are_checked_when_the_ring_is_attached() -> None:
    m, mv = make_ring()
    GuestRing(mv).set(READ, 3)
    with pytest.raises(RingCorrupt):
        RingReader(mv)
    with pytest.raises(ValueError):
        RingReader(mv[:100])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    control=st.tuples(*[st.integers(0, 2**32 - 1)] * 5),
    data=st.binary(min_size=0, max_size=PAGE_SIZE),
    small=st.booleans(),
)
def test_hostile_rings_raise_only_ring_errors_and_every_bad_packet_is_counted(
    control: tuple[int, int, int, int, int], data: bytes, small: bool
) -> None:
    m, mv = make_ring(1)
    w, r, mask, pend, feat = control
    if small:  # mostly-plausible indices reach the packet checks
        w, r = (w % PAGE_SIZE) & ~7, (r % PAGE_SIZE) & ~7
    struct.pack_into("<IIII", mv, 0, w, r, mask, pend)
    struct.pack_into("<I", mv, 64, feat)
    mv[PAGE_SIZE : PAGE_SIZE + len(data)] = data
    try:
        reader = RingReader(mv)
    except RingCorrupt:
        return
    before = reader.available() if w % 8 == 0 and w < PAGE_SIZE else 0
    try:
        pkts = reader.read_packets()
    except RingCorrupt:
        assert reader.bad_packets >= 1
        return
    for p in pkts:
        assert p.type in {int(t) for t in PacketType} - {0}
    assert reader.read_index == w
    # what was published: from the read index forward to the write index, around the end
    assert before == (w - r) % PAGE_SIZE
    if before == 0:
        assert pkts == [] and reader.bad_packets == 0
