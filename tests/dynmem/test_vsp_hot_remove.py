"""Hot-remove (DM protocol 2.0, messages 13/14) at the VSP, driven message by message as a guest
VSC would: the capability negotiated both ways, the request, the guest's ranges over several
responses, and every hostile answer refused, logged and counted while the VSP goes on."""

from __future__ import annotations

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import DmState, DynamicMemoryVsp
from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.vmbus.vsp import VspError

pytestmark = pytest.mark.simulation

BOOT = PageRange(0, 65536)  # 256 MiB at GPA 0
ADDED = PageRange(0x40000, 32768)  # a hot-added 128 MiB region at 1 GiB
OUTSIDE = PageRange(0x100000, 512)  # 4 GiB: no RAM there


class Host:
    """A VSP over 256 MiB of boot RAM and a hot-added region, its messages and callbacks
    recorded; `owner=False` builds it without a memory owner (hot-remove not offered)."""

    def __init__(self, owner: bool = True, rings: tuple[PageRange, ...] = ()) -> None:
        self.sent: list[p.Message] = []
        self.removed: list[PageRange] = []
        self.done: list[int] = []
        self.vsp = DynamicMemoryVsp(
            RangeSet([BOOT, ADDED]),
            lambda raw: self.sent.append(p.decode(raw)) is None,
            assigned_pages=lambda: 0,
            on_hot_removed=self.removed.extend if owner else None,
            on_hot_remove_done=self.done.append,
            host_pages=lambda: rings,
        )

    def guest(self, mtype: T, body: object, **kw: object) -> None:
        self.vsp.on_message(p.encode(mtype, body, **kw), 0)  # type: ignore[arg-type]

    def connect(self, version: int = p.Version.WIN10, hot_remove: int = 1) -> None:
        self.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=version), trans_id=7)
        caps = p.DmCapabilities(balloon=1, hot_add=1, hot_add_alignment=1, hot_remove=hot_remove)
        self.guest(T.CAPABILITIES_REPORT, caps)

    def respond(self, *ranges: PageRange, more: int = 0, result: int = 1) -> None:
        body = p.DmHotRemoveResponse(result=result, more_pages=more)
        self.guest(T.MEM_HOT_REMOVE_RESPONSE, body, ranges=list(ranges))


def test_the_capability_is_answered_only_to_a_2_0_guest_that_reports_it_with_an_owner() -> None:
    h = Host()
    h.connect()
    assert h.sent[-1].body.hot_remove == 1 and h.vsp.hot_remove_offered
    for host, version, cap in [
        (Host(), p.Version.WIN10, 0),  # the guest cannot
        (Host(), p.Version.WIN8, 1),  # the bit means nothing before 2.0
        (Host(owner=False), p.Version.WIN10, 1),  # no one to take the memory back
    ]:
        host.connect(version, cap)
        assert host.sent[-1].body.hot_remove == 0 and not host.vsp.hot_remove_offered
        with pytest.raises(VspError, match="hot-remove capability"):
            host.vsp.hot_remove(512)


def test_a_hot_remove_takes_the_guests_ranges_over_several_responses() -> None:
    h = Host()
    h.connect()
    h.vsp.hot_remove(ADDED.count + 512)
    req = h.sent[-1]
    assert req.type is T.MEM_HOT_REMOVE_REQUEST and req.body.page_count == ADDED.count + 512
    assert req.body.qos_flags == p.QOS_LARGE and h.vsp.state is DmState.HOT_REMOVE_WAIT
    h.respond(ADDED, more=1)  # the whole hot-added region first
    assert h.vsp.state is DmState.HOT_REMOVE_WAIT and h.removed == [ADDED]
    h.respond(PageRange(0x8000, 512))  # then a free 2 MiB block of boot RAM
    assert h.vsp.state is DmState.IDLE and h.done == [ADDED.count + 512]
    assert h.vsp.ram.pages == BOOT.count - 512
    assert not h.vsp.ram.overlaps(*ADDED) and not h.vsp.ram.overlaps(0x8000, 512)
    assert h.vsp.counters["hot_removed_pages"] == ADDED.count + 512
    assert h.vsp.counters["refused"] == 0


def test_a_guest_that_gives_nothing_ends_the_transaction() -> None:
    h = Host()
    h.connect()
    h.vsp.hot_remove(4096)
    h.respond(result=0)
    assert h.vsp.state is DmState.IDLE and h.done == [0] and h.removed == []
    assert h.vsp.counters["refused"] == 0


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (PageRange(ADDED.start, 0), "no pages"),
        (PageRange(ADDED.start + 1, 512), "not whole 2 MiB blocks"),
        (PageRange(ADDED.start, 100), "not whole 2 MiB blocks"),
        (OUTSIDE, "not RAM of this partition"),
        (PageRange(ADDED.end - 512, 1024), "not RAM of this partition"),  # runs past the region
        (PageRange(0, 8192), "more than the 4096 pages asked"),
    ],
)
def test_each_bad_range_is_refused_logged_and_counted_and_the_good_ones_taken(
    bad: PageRange, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    h = Host()
    h.connect()
    h.vsp.hot_remove(4096)
    good = PageRange(ADDED.start, 512)
    h.respond(good, bad)
    assert h.removed == [good] and h.done == [512]
    assert h.vsp.counters["hot_remove_bad_ranges"] == 1 and h.vsp.counters["refused"] == 1
    assert any(why in r.getMessage() for r in caplog.records), [
        r.getMessage() for r in caplog.records
    ]
    assert h.vsp.state is DmState.IDLE and not h.vsp.stopped
    assert h.vsp.ram.pages == BOOT.count + ADDED.count - 512


def test_pages_the_host_uses_for_a_ring_are_refused() -> None:
    h = Host(rings=(PageRange(0x1100, 6),))
    h.connect()
    h.vsp.hot_remove(1024)
    h.respond(PageRange(0x1000, 512), PageRange(0x1400, 512))
    assert h.removed == [PageRange(0x1400, 512)]
    assert h.vsp.counters["hot_remove_bad_ranges"] == 1 and h.vsp.ram.contains(0x1000, 512)


def test_a_range_named_twice_or_removed_already_or_ballooned_is_refused() -> None:
    h = Host()
    h.connect()
    h.vsp.ballooned.add(0x1000, 512)  # the host holds these through the balloon
    h.vsp.hot_remove(8192)
    r = PageRange(ADDED.start, 512)
    h.respond(r, r, PageRange(0x1000, 512), more=1)  # twice in one response; ballooned
    h.respond(r)  # and again in the next: removed already
    assert h.removed == [r]
    assert h.vsp.counters["hot_remove_bad_ranges"] == 3
    assert h.vsp.ballooned.pages == 512 and h.vsp.state is DmState.IDLE


def test_a_response_with_no_request_outstanding_is_refused_and_changes_nothing() -> None:
    h = Host()
    h.connect()
    h.respond(ADDED)
    assert h.removed == [] and h.vsp.ram.contains(*ADDED)
    assert h.vsp.counters["hot_remove_unasked"] == 1 and h.vsp.counters["refused"] == 1
    h.vsp.balloon(512)  # in another transaction, too
    h.respond(ADDED)
    assert h.vsp.counters["hot_remove_unasked"] == 2 and h.vsp.state is DmState.BALLOON_WAIT
    assert h.removed == []


def test_a_bad_result_is_refused_but_the_ranges_it_names_are_checked_and_taken() -> None:
    h = Host()
    h.connect()
    h.vsp.hot_remove(512)
    h.respond(PageRange(ADDED.start, 512), result=7)
    assert h.removed == [PageRange(ADDED.start, 512)] and h.vsp.counters["refused"] == 1


def test_a_hot_remove_the_guest_leaves_unanswered_times_out_and_keeps_what_it_named() -> None:
    now = [0.0]
    h = Host()
    h.vsp._clock = lambda: now[0]
    h.connect()
    h.vsp.hot_remove(4096)
    h.respond(PageRange(ADDED.start, 512), more=1)
    now[0] += h.vsp.op_timeout + 1
    h.vsp.tick()
    assert h.vsp.state is DmState.IDLE and h.vsp.counters["timeouts"] == 1
    h.respond(PageRange(ADDED.start + 512, 512))  # too late: refused
    assert h.removed == [PageRange(ADDED.start, 512)]
    assert h.vsp.counters["hot_remove_unasked"] == 1


def test_the_request_is_checked_and_a_transaction_in_flight_is_not_saved() -> None:
    h = Host()
    h.connect()
    with pytest.raises(VspError, match="1..585728"):
        h.vsp.hot_remove(0)
    h.vsp.hot_remove(512)
    with pytest.raises(VspError, match="needs the VSP idle"):
        h.vsp.hot_remove(512)
    with pytest.raises(VspError, match="in flight"):
        h.vsp.save()
    h.respond(PageRange(ADDED.start, 512))
    st = h.vsp.save()
    assert st.caps is not None and st.caps.hot_remove
    b = Host()
    b.vsp.ram.remove(ADDED.start, 512)  # the memory layout restored first
    b.vsp.restore(st)
    assert b.vsp.hot_remove_offered and b.vsp.state is DmState.IDLE
