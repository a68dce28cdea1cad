"""The Dynamic Memory messages, byte for byte against reference/dynamic-memory-protocol.md 2.3."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.memory.ranges import PageRange

pytestmark = pytest.mark.unit


def test_the_header_is_type_size_and_a_guest_made_transaction_id() -> None:
    raw = p.encode(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse(), trans_id=0x11223344)
    assert raw == struct.pack("<HHI", 9, 8, 0x11223344)


def test_a_version_request_carries_minor_major_and_is_last_attempt() -> None:
    raw = p.encode(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN7, is_last_attempt=1))
    assert raw == struct.pack("<HHIHHI", 1, 16, 0, 3, 0, 1)
    raw = p.encode(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10))
    assert raw[8:12] == struct.pack("<HH", 0, 2)  # @8 minor, @10 major
    assert p.decode(raw).body.version == p.Version.WIN10


def test_a_version_response_sets_bit0_of_a_u64_when_accepted() -> None:
    raw = p.encode(T.VERSION_RESPONSE, p.DmVersionResponse(is_accepted=1), trans_id=5)
    assert raw == struct.pack("<HHIQ", 2, 16, 5, 1)


def test_capabilities_bits_are_balloon_hot_add_alignment_and_hot_remove() -> None:
    caps = p.DmCapabilities(balloon=1, hot_add=1, hot_add_alignment=7, min_page_cnt=0)
    caps.max_page_number = 2**64 - 1
    raw = p.encode(T.CAPABILITIES_REPORT, caps)
    assert raw == struct.pack("<HHIQQQ", 3, 32, 0, 1 | 2 | (7 << 2), 0, 2**64 - 1)
    raw = p.encode(
        T.CAPABILITIES_RESPONSE,
        p.DmCapabilitiesResponse(is_accepted=1, hot_remove=1, suppress_pressure_reports=1),
    )
    assert raw[8:] == struct.pack("<Q", 7)


def test_a_status_report_is_48_bytes_with_committed_at_offset_16() -> None:
    st_ = p.DmStatus(num_avail=1, num_committed=2, page_file_size=3, zero_free=4)
    st_.page_file_writes, st_.io_diff = 5, 6
    raw = p.encode(T.STATUS_REPORT, st_)
    assert raw == struct.pack("<HHIQQQQII", 5, 48, 0, 1, 2, 3, 4, 5, 6)
    m = p.decode(raw)
    assert (m.body.num_avail, m.body.num_committed) == (1, 2)


def test_a_page_range_is_a_40_bit_pfn_and_a_24_bit_count() -> None:
    r = p.DmMemPageRange(start_page=0x12_3456_789A, page_cnt=0xABCDEF)
    assert bytes(r) == struct.pack("<Q", 0x12_3456_789A | (0xABCDEF << 40))


def test_a_balloon_response_carries_more_pages_and_its_ranges() -> None:
    ranges = (PageRange(0x100, 512), PageRange(0x400, 1))
    raw = p.encode(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=1), ranges=ranges)
    assert raw[:16] == struct.pack("<HHIII", 7, 32, 0, 0, 1 | (2 << 1))
    assert raw[16:] == struct.pack("<QQ", 0x100 | (512 << 40), 0x400 | (1 << 40))
    m = p.decode(raw)
    assert m.ranges == ranges and m.body.more_pages == 1


def test_an_unballoon_request_has_more_pages_at_8_and_range_count_at_12() -> None:
    raw = p.encode(
        T.UNBALLOON_REQUEST, p.DmUnballoonRequest(more_pages=0), ranges=[PageRange(9, 3)]
    )
    assert raw == struct.pack("<HHIIIQ", 8, 24, 0, 0, 1, 9 | (3 << 40))


def test_balloon_request_and_hot_add_layouts() -> None:
    raw = p.encode(T.BALLOON_REQUEST, p.DmBalloon(num_pages=1000))
    assert raw == struct.pack("<HHIII", 6, 16, 0, 1000, 0)
    ha = p.DmHotAdd()
    ha.range.start_page, ha.range.page_cnt = 0x40000, 0x8000
    raw = p.encode(T.MEM_HOT_ADD_REQUEST, ha)
    assert raw == struct.pack("<HHIQ", 10, 16, 0, 0x40000 | (0x8000 << 40))
    har = p.DmHotAddWithRegion()
    har.range.start_page, har.range.page_cnt = 0x40000, 0x100
    har.region.start_page, har.region.page_cnt = 0x40000, 0x8000
    raw = p.encode(T.MEM_HOT_ADD_REQUEST, har)
    assert len(raw) == 24 and isinstance(p.decode(raw).body, p.DmHotAddWithRegion)
    raw = p.encode(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=256, result=1))
    assert raw == struct.pack("<HHIII", 11, 16, 0, 256, 1)


def test_the_info_message_announces_the_maximum_dynamic_page_count() -> None:
    raw = p.encode(T.INFO_MESSAGE, p.DmInfoMsg(), info=p.info_max_page_count(262144))
    assert raw == struct.pack("<HHIIIIIQ", 12, 32, 0, 0, 16, 0, 8, 262144)
    assert p.decode(raw).info[8:] == struct.pack("<Q", 262144)


def test_hot_remove_messages_of_protocol_2_0() -> None:
    raw = p.encode(
        T.MEM_HOT_REMOVE_REQUEST, p.DmHotRemove(virtual_node=1, page_count=9, qos_flags=3)
    )
    assert raw == struct.pack("<HHIIIII", 13, 24, 0, 1, 9, 3, 0)
    raw = p.encode(
        T.MEM_HOT_REMOVE_RESPONSE,
        p.DmHotRemoveResponse(result=1, more_pages=1),
        ranges=[(5, 6)],  # type: ignore[list-item]
    )
    assert raw == struct.pack("<HHIIIQQ", 14, 32, 0, 1, 1, 1, 5 | (6 << 40))


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x05\x00", "shorter"),
        (struct.pack("<HHI", 5, 4, 0), "size=4"),
        (struct.pack("<HHI", 5, 64, 0) + bytes(40), "size=64"),
        (struct.pack("<HHI", 99, 8, 0), "unknown message type"),
        (struct.pack("<HHI", 0, 8, 0), "DM_ERROR"),
        (struct.pack("<HHI", 5, 16, 0) + bytes(8), "at least 48"),
        (struct.pack("<HHI", 9, 16, 0) + bytes(8), "exactly 8"),
        (struct.pack("<HHIII", 7, 24, 0, 0, 2 << 1) + bytes(8), "range_count=2"),
        (struct.pack("<HHIII", 12, 16, 0, 0, 4), "info_size=4"),
    ],
)
def test_malformed_messages_are_refused_with_what_was_wrong(raw: bytes, why: str) -> None:
    with pytest.raises(p.DmDecodeError, match=why):
        p.decode(raw)


def test_a_message_may_arrive_with_the_ring_pad_after_it() -> None:
    raw = p.encode(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse()) + bytes(8)
    assert p.decode(raw).type is T.UNBALLOON_RESPONSE


def test_the_host_cannot_encode_what_the_wire_cannot_carry() -> None:
    with pytest.raises(ValueError, match="split"):
        p.encode(T.UNBALLOON_REQUEST, p.DmUnballoonRequest(), ranges=[PageRange(0, 1 << 24)])
    with pytest.raises(ValueError, match="fewer ranges"):
        p.encode(T.UNBALLOON_REQUEST, p.DmUnballoonRequest(), ranges=[PageRange(0, 1)] * 511)
    with pytest.raises(TypeError):
        p.encode(T.STATUS_REPORT, p.DmBalloon())


_BODIES = [
    (T.VERSION_REQUEST, p.DmVersionRequest),
    (T.VERSION_RESPONSE, p.DmVersionResponse),
    (T.CAPABILITIES_REPORT, p.DmCapabilities),
    (T.CAPABILITIES_RESPONSE, p.DmCapabilitiesResponse),
    (T.STATUS_REPORT, p.DmStatus),
    (T.BALLOON_REQUEST, p.DmBalloon),
    (T.UNBALLOON_RESPONSE, p.DmUnballoonResponse),
    (T.MEM_HOT_ADD_REQUEST, p.DmHotAdd),
    (T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse),
    (T.MEM_HOT_REMOVE_REQUEST, p.DmHotRemove),
]


@settings(max_examples=100, deadline=None)
@given(
    which=st.integers(0, len(_BODIES) - 1),
    fill=st.binary(min_size=48, max_size=48),
    tid=st.integers(0, 2**32 - 1),
)
def test_every_fixed_message_round_trips(which: int, fill: bytes, tid: int) -> None:
    mtype, cls = _BODIES[which]
    body = cls.from_buffer_copy(fill[: len(bytes(cls()))])
    raw = p.encode(mtype, body, trans_id=tid)
    m = p.decode(raw)
    assert m.type is mtype and m.trans_id == tid and bytes(m.body) == raw


@settings(max_examples=100, deadline=None)
@given(
    ranges=st.lists(
        st.tuples(st.integers(0, p.MAX_PFN), st.integers(0, p.MAX_RANGE_PAGES)), max_size=510
    ),
    more=st.integers(0, 1),
)
def test_balloon_responses_round_trip_with_up_to_510_ranges(
    ranges: list[tuple[int, int]], more: int
) -> None:
    prs = tuple(PageRange(*r) for r in ranges)
    raw = p.encode(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=more), ranges=prs, trans_id=3)
    m = p.decode(raw)
    assert m.ranges == prs and m.body.more_pages == more and len(raw) <= 4096


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda t, s, rest: struct.pack("<HHI", t, s, 0) + rest,
            st.integers(0, 16),
            st.integers(0, 300),
            st.binary(max_size=300),
        ),
    )
)
def test_hostile_bytes_decode_or_raise_dm_decode_error_only(raw: bytes) -> None:
    try:
        m = p.decode(raw)
    except p.DmDecodeError:
        return
    assert m.body.hdr.size <= len(raw)
