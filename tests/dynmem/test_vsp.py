"""The Dynamic Memory VSP, driven message by message as the guest's VSC would."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.status import MemoryStatus
from pyhv.dynmem.vsp import DmState, DynamicMemoryVsp
from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.vmbus.packet import Packet, PacketType
from pyhv.vmbus.vsp import VspError

pytestmark = pytest.mark.simulation

RAM_PAGES = 65536  # 256 MiB at GPA 0


class Host:
    """A VSP with its outgoing messages and callbacks recorded."""

    def __init__(self, ring_room: int = 1000) -> None:
        self.sent: list[p.Message] = []
        self.room = ring_room
        self.events: list[tuple[str, object]] = []
        self.vsp = DynamicMemoryVsp(
            RangeSet([(0, RAM_PAGES)]),
            self._send,
            assigned_pages=lambda: RAM_PAGES,
            on_status=lambda s: self.events.append(("status", s)),
            on_ballooned=lambda r: self.events.append(("ballooned", r)),
            on_balloon_done=lambda n: self.events.append(("balloon_done", n)),
            on_unballoon_done=lambda r: self.events.append(("unballoon_done", r)),
            on_hot_add_done=lambda r, n, ok: self.events.append(("hot_add_done", (r, n, ok))),
            on_stop=lambda why: self.events.append(("stop", why)),
        )

    def _send(self, raw: bytes) -> bool:
        if self.room <= 0:
            return False
        self.room -= 1
        self.sent.append(p.decode(raw))
        return True

    def guest(self, mtype: T, body: object, **kw: object) -> None:
        self.vsp.on_message(p.encode(mtype, body, **kw) + bytes(4), 0)  # type: ignore[arg-type]

    def connect(self, version: int = p.Version.WIN10, hot_add: int = 1) -> None:
        self.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=version), trans_id=7)
        self.guest(
            T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1, hot_add=hot_add, hot_add_alignment=7)
        )


def test_version_negotiation_accepts_win10_and_echoes_the_guests_transaction_id() -> None:
    h = Host()
    h.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=77)
    assert h.sent[-1].type is T.VERSION_RESPONSE and h.sent[-1].body.is_accepted == 1
    assert h.sent[-1].trans_id == 77
    assert h.vsp.state is DmState.CAPS and h.vsp.version == p.Version.WIN10


@pytest.mark.parametrize("version", [p.Version.WIN8, p.Version.WIN7])
def test_older_guests_negotiate_win8_or_win7(version: int) -> None:
    h = Host()
    h.connect(version)
    assert h.vsp.state is DmState.IDLE and h.vsp.version == version


def test_a_version_beyond_2_0_is_rejected_and_the_guest_may_retry() -> None:
    h = Host()
    h.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=0x00030000))
    assert h.sent[-1].body.is_accepted == 0 and h.vsp.state is DmState.VERSION
    h.connect(p.Version.WIN8)
    assert h.vsp.state is DmState.IDLE


def test_capabilities_are_accepted_and_pressure_reports_requested() -> None:
    h = Host()
    h.connect()
    resp = h.sent[-1]
    assert resp.type is T.CAPABILITIES_RESPONSE
    assert (resp.body.is_accepted, resp.body.suppress_pressure_reports) == (1, 0)
    assert h.vsp.caps is not None and h.vsp.caps.hot_add_alignment_mib == 128
    assert [t.new for t in h.vsp.history] == [DmState.CAPS, DmState.IDLE]


def test_a_status_report_publishes_committed_available_and_pressure() -> None:
    h = Host()
    h.connect()
    h.guest(T.STATUS_REPORT, p.DmStatus(num_avail=1000, num_committed=32768))
    what, status = h.events[-1]
    assert what == "status" and isinstance(status, MemoryStatus)
    assert (status.committed_pages, status.available_pages, status.pressure) == (32768, 1000, 50.0)


def test_a_status_report_before_capabilities_is_refused() -> None:
    h = Host()
    h.guest(T.STATUS_REPORT, p.DmStatus(num_committed=5))
    assert h.vsp.counters["refused"] == 1 and h.events == []


def test_a_balloon_collects_the_guests_ranges_over_several_responses() -> None:
    h = Host()
    h.connect()
    h.vsp.balloon(1024)
    req = h.sent[-1]
    assert req.type is T.BALLOON_REQUEST and req.body.num_pages == 1024
    assert h.vsp.state is DmState.BALLOON_WAIT
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=1), ranges=[PageRange(0x1000, 512)])
    assert h.vsp.state is DmState.BALLOON_WAIT
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=0), ranges=[PageRange(0x3000, 512)])
    assert h.vsp.state is DmState.IDLE
    assert h.events == [
        ("ballooned", [PageRange(0x1000, 512)]),
        ("ballooned", [PageRange(0x3000, 512)]),
        ("balloon_done", 1024),
    ]
    assert h.vsp.ballooned.pages == 1024


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (PageRange(RAM_PAGES - 10, 20), "outside the partition"),
        (PageRange(0x1000, 1), "already ballooned"),
        (PageRange(0x5000, 600), "more than asked"),
        (PageRange(0x5000, 0), "no pages"),
    ],
)
def test_bad_balloon_ranges_are_refused_and_counted_the_rest_is_kept(
    bad: PageRange, why: str
) -> None:
    h = Host()
    h.connect()
    h.vsp.ballooned.add(0x1000, 8)  # from an earlier balloon
    h.vsp.balloon(512)
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x8000, 100), bad])
    assert h.vsp.counters["bad_ranges"] == 1 and h.vsp.counters["refused"] == 1, why
    assert ("ballooned", [PageRange(0x8000, 100)]) in h.events
    assert h.vsp.state is DmState.IDLE


def test_overlapping_ranges_in_one_response_are_refused() -> None:
    h = Host()
    h.connect()
    h.vsp.balloon(100)
    h.guest(
        T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(10, 20), PageRange(20, 20)]
    )
    assert h.vsp.ballooned.pages == 20 and h.vsp.counters["bad_ranges"] == 1


def test_an_empty_balloon_response_means_the_guest_is_at_its_minimum() -> None:
    h = Host()
    h.connect()
    h.vsp.balloon(100)
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse())
    assert h.events[-1] == ("balloon_done", 0) and h.vsp.counters["balloon_at_minimum"] == 1


def test_responses_in_the_wrong_state_are_refused_and_the_vsp_goes_on() -> None:
    h = Host()
    h.connect()
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(10, 20)])
    h.guest(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    h.guest(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=1, result=1))
    h.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10))
    h.guest(T.BALLOON_REQUEST, p.DmBalloon(num_pages=1))  # a host->guest message
    assert h.vsp.counters["refused"] == 5 and h.vsp.ballooned.pages == 0
    assert h.vsp.state is DmState.IDLE
    h.vsp.balloon(20)
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(10, 20)])
    assert h.vsp.ballooned.pages == 20


def test_unballoon_sends_the_ranges_and_waits_for_one_response() -> None:
    h = Host()
    h.connect()
    h.vsp.balloon(1024)
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x1000, 1024)])
    h.vsp.unballoon([PageRange(0x1200, 512)])
    req = h.sent[-1]
    assert req.type is T.UNBALLOON_REQUEST and req.ranges == (PageRange(0x1200, 512),)
    assert req.body.more_pages == 0 and h.vsp.state is DmState.UNBALLOON_WAIT
    h.guest(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    assert h.events[-1] == ("unballoon_done", [PageRange(0x1200, 512)])
    assert list(h.vsp.ballooned) == [PageRange(0x1000, 512)] and h.vsp.state is DmState.IDLE


def test_a_large_unballoon_is_split_into_messages_with_more_pages() -> None:
    h = Host()
    h.connect()
    h.vsp.balloon(600)
    many = [PageRange(i * 2, 1) for i in range(600)]
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=1), ranges=many[:510])
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=many[510:])
    h.vsp.unballoon(many)
    reqs = [m for m in h.sent if m.type is T.UNBALLOON_REQUEST]
    assert [len(m.ranges) for m in reqs] == [510, 90]
    assert [m.body.more_pages for m in reqs] == [1, 0]


def test_the_host_cannot_unballoon_pages_the_guest_never_had() -> None:
    h = Host()
    h.connect()
    with pytest.raises(VspError, match="not in the guest's balloon"):
        h.vsp.unballoon([PageRange(0, 1)])
    assert h.vsp.state is DmState.IDLE


def test_hot_add_with_a_region_adds_the_pages_to_the_guests_ram() -> None:
    h = Host()
    h.connect()
    rng = PageRange(RAM_PAGES, 32768)
    h.vsp.hot_add(rng, PageRange(RAM_PAGES, 32768))
    req = h.sent[-1]
    assert req.type is T.MEM_HOT_ADD_REQUEST and req.body.hdr.size == 24
    h.guest(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=32768, result=1))
    assert h.events[-1] == ("hot_add_done", (rng, 32768, True))
    assert h.vsp.ram.contains(RAM_PAGES, 32768) and not h.vsp.hot_add_disabled


def test_a_partial_hot_add_means_all_further_hot_adds_fail() -> None:
    h = Host()
    h.connect()
    h.vsp.hot_add(PageRange(RAM_PAGES, 32768))
    assert h.sent[-1].body.hdr.size == 16
    h.guest(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=100, result=1))
    assert h.vsp.hot_add_disabled
    with pytest.raises(VspError, match="permanently"):
        h.vsp.hot_add(PageRange(2 * RAM_PAGES, 32768))


def test_a_failed_hot_add_with_result_0_may_be_retried() -> None:
    h = Host()
    h.connect()
    h.vsp.hot_add(PageRange(RAM_PAGES, 32768))
    h.guest(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=0, result=0))
    assert not h.vsp.hot_add_disabled and h.vsp.state is DmState.IDLE


def test_a_hot_add_response_claiming_more_pages_than_asked_is_refused() -> None:
    h = Host()
    h.connect()
    h.vsp.hot_add(PageRange(RAM_PAGES, 100))
    h.guest(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=101, result=1))
    assert h.vsp.counters["refused"] == 1 and h.vsp.state is DmState.HOT_ADD_WAIT
    h.vsp.timeout()
    assert h.vsp.state is DmState.IDLE and h.vsp.counters["timeouts"] == 1


def test_hot_add_is_not_asked_of_a_guest_without_the_capability() -> None:
    h = Host()
    h.connect(hot_add=0)
    with pytest.raises(VspError, match="capability"):
        h.vsp.hot_add(PageRange(RAM_PAGES, 100))


def test_the_info_message_needs_protocol_1_0() -> None:
    h = Host()
    h.connect(p.Version.WIN7)
    with pytest.raises(VspError, match="1.0"):
        h.vsp.send_info_max_page_count(1 << 20)
    h2 = Host()
    h2.connect(p.Version.WIN8)
    h2.vsp.send_info_max_page_count(1 << 20)
    assert h2.sent[-1].type is T.INFO_MESSAGE and h2.sent[-1].info[8:] == (1 << 20).to_bytes(
        8, "little"
    )


def test_one_transaction_at_a_time() -> None:
    h = Host()
    h.connect()
    h.vsp.balloon(10)
    with pytest.raises(VspError, match="idle"):
        h.vsp.balloon(10)


def test_messages_wait_in_the_outbox_while_the_ring_is_full() -> None:
    h = Host(ring_room=1)
    h.connect()
    assert h.vsp.outbox_len == 1 and h.vsp.counters["ring_full"] >= 1
    h.room = 10
    assert h.vsp.flush() == 1 and h.sent[-1].type is T.CAPABILITIES_RESPONSE


def test_a_guest_sending_only_garbage_gets_its_channel_stopped() -> None:
    h = Host()
    for _ in range(16):
        h.vsp.on_message(b"\xff" * 8, 0)
    assert h.vsp.state is DmState.STOPPED and h.events[-1][0] == "stop"
    h.vsp.on_packet(Packet(PacketType.DATA_INBAND, 0, 0, b"x"))
    assert h.vsp.counters["after_stop"] == 1


def test_only_inband_packets_are_dynamic_memory_messages() -> None:
    h = Host()
    h.vsp.on_packet(Packet(PacketType.COMP, 0, 0, bytes(16)))
    assert h.vsp.counters["refused"] == 1


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    msgs=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(
                lambda t, rest: bytes(p.DmHeader(type=t, size=8 + len(rest))) + rest,
                st.integers(0, 15),
                st.binary(max_size=120),
            ),
            st.builds(
                lambda rs, more: p.encode(
                    T.BALLOON_RESPONSE,
                    p.DmBalloonResponse(more_pages=more),
                    ranges=[PageRange(*r) for r in rs],
                ),
                st.lists(st.tuples(st.integers(0, 2 * RAM_PAGES), st.integers(0, 600)), max_size=8),
                st.integers(0, 1),
            ),
        ),
        max_size=30,
    ),
    start_idle=st.booleans(),
)
def test_hostile_guest_messages_never_crash_the_vsp(msgs: list[bytes], start_idle: bool) -> None:
    h = Host()
    if start_idle:
        h.connect()
        h.vsp.balloon(1000)
    for m in msgs:
        before = h.vsp.counters["refused"] + h.vsp.counters["accepted"]
        h.vsp.on_message(m, 0)
        after = h.vsp.counters["refused"] + h.vsp.counters["accepted"]
        assert h.vsp.stopped or after > before  # every message is judged: accepted or refused
    b = h.vsp.ballooned
    assert all(h.vsp.ram.contains(*r) for r in b)


def test_every_transition_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="pyhv.vsp")
    h = Host()
    h.connect()
    h.vsp.balloon(10)
    assert h.vsp.counters["IDLE->BALLOON_WAIT"] == 1 and h.vsp.counters["transitions"] == 3
    assert h.vsp.history[-1].why == "balloon 10 pages"
    assert "IDLE -> BALLOON_WAIT: balloon 10 pages" in caplog.text


def test_an_undeclared_transition_is_a_host_bug() -> None:
    h = Host()
    with pytest.raises(VspError, match="no transition VERSION -> IDLE"):
        h.vsp._to(DmState.IDLE, "skipping negotiation")


def test_a_reset_hands_back_the_balloon_except_pages_already_being_unballooned() -> None:
    h = Host()
    h.connect()
    h.vsp.balloon(300)
    h.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x100, 300)])
    h.vsp.unballoon([PageRange(0x100, 100)])  # the host reclaimed these already
    held = h.vsp.reset("guest rebooted")
    assert held == [PageRange(0x100 + 100, 200)]
    assert h.vsp.state is DmState.VERSION and h.vsp.caps is None and h.vsp.ballooned.pages == 0
    h.connect(p.Version.WIN7)
    assert h.vsp.state is DmState.IDLE


def test_a_guest_asking_versions_without_reading_its_ring_cannot_grow_the_outbox() -> None:
    h = Host(ring_room=0)  # the guest never reads the host->guest ring
    for _ in range(10_000):
        h.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=0x00030000))  # rejected, may retry
        if h.vsp.stopped:
            break
    assert h.vsp.outbox_len <= 64  # a few replies, not one per request
    assert h.vsp.stopped and h.events[-1][0] == "stop"
    assert h.vsp.counters["unread_replies"] == h.vsp.MAX_CONSECUTIVE_BAD
