"""The Dynamic Memory goal as part of the VSP's state machine (as QEMU's hv-balloon handles its
target): driven message by message, with no thread and a clock the test moves, against a real
memory manager over memfds. Down is a balloon; up is an unballoon first, then a hot-add."""

from __future__ import annotations

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import WAITING, DmState, DynamicMemoryVsp
from pyhv.memory.manager import PAGE_SIZE, MemfdRegion, MemoryManager
from pyhv.memory.ranges import PageRange, RangeSet

pytestmark = pytest.mark.unit

RAM_PAGES = 16384  # 64 MiB at GPA 0
HOT_ADD_ALIGN = 32768  # the guest's 128 MiB memory block (hot_add_alignment=7)


class World:
    """A VSP whose memory owner is a real MemoryManager; the guest's side is the test."""

    def __init__(self, *, balloon: int = 1, hot_add: int = 1, timeout: float = 10.0) -> None:
        self.now = 0.0
        self.sent: list[p.Message] = []
        self.done: list[str | None] = []
        self.mm = MemoryManager(4 * RAM_PAGES * PAGE_SIZE)
        self.regions = [MemfdRegion(0, RAM_PAGES * PAGE_SIZE)]
        self.part = self.mm.add_partition("vm", self.regions, self._map_region)
        self.vsp = DynamicMemoryVsp(
            RangeSet([(0, RAM_PAGES)]),
            self._send,
            assigned_pages=lambda: self.part.assigned_pages,
            on_ballooned=lambda r: self.mm.release("vm", r),
            reclaim=lambda r: self.mm.reclaim("vm", r),
            map_hot_add=self._map_hot_add,
            on_goal_done=self.done.append,
            op_timeout=timeout,
            clock=lambda: self.now,
        )
        self.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10))
        self.guest(
            T.CAPABILITIES_REPORT,
            p.DmCapabilities(balloon=balloon, hot_add=hot_add, hot_add_alignment=7),
        )
        assert self.vsp.state is DmState.IDLE
        self.sent.clear()

    def _send(self, raw: bytes) -> bool:
        self.sent.append(p.decode(raw))
        return True

    def _map_region(self, gpa: int, size: int) -> MemfdRegion:
        r = MemfdRegion(gpa, size)
        self.regions.append(r)
        return r

    def _map_hot_add(self, pages: int, align: int) -> PageRange:
        region = self.mm.hot_add("vm", pages, align_pages=align)
        return PageRange(region.gpa // PAGE_SIZE, pages)

    def guest(self, mtype: T, body: object, **kw: object) -> None:
        self.vsp.on_message(p.encode(mtype, body, **kw), 0)  # type: ignore[arg-type]

    def last(self) -> p.Message:
        return self.sent[-1]

    def close(self) -> None:
        for r in self.regions:
            r.close()


@pytest.fixture
def w() -> World:
    world = World()
    yield world  # type: ignore[misc]
    world.close()


def test_a_lower_goal_balloons_the_difference_and_is_reached(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES - 1000)
    req = w.last()
    assert req.type is T.BALLOON_REQUEST and req.body.num_pages == 1000
    assert w.vsp.state is DmState.BALLOON_WAIT and w.vsp.operation == "balloon 1000 pages"
    w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x3000, 1000)])
    assert w.vsp.state is DmState.IDLE and w.vsp.goal is None and w.done == [None]
    assert w.part.assigned_pages == RAM_PAGES - 1000 and w.mm.free_pages == 3 * RAM_PAGES + 1000


def test_a_guest_giving_part_of_a_balloon_is_asked_again_for_the_rest(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES - 1000)
    w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x3000, 600)])
    req = w.last()
    assert req.type is T.BALLOON_REQUEST and req.body.num_pages == 400
    assert w.vsp.state is DmState.BALLOON_WAIT and w.done == []
    w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x2000, 400)])
    assert w.done == [None] and w.part.assigned_pages == RAM_PAGES - 1000


def test_a_higher_goal_unballoons_first_then_hot_adds_the_rest(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES - 1000)
    w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x3000, 1000)])
    assert w.done == [None]
    w.done.clear()
    w.vsp.set_goal(RAM_PAGES + 500)
    req = w.last()
    assert req.type is T.UNBALLOON_REQUEST and req.ranges == (PageRange(0x3000, 1000),)
    # the host backs the pages again before the guest may touch them
    assert w.part.ballooned.pages == 0 and w.part.assigned_pages == RAM_PAGES
    w.guest(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    req = w.last()
    assert req.type is T.MEM_HOT_ADD_REQUEST
    assert (req.body.range.start_page, req.body.range.page_cnt) == (HOT_ADD_ALIGN, 500)
    assert w.vsp.state is DmState.HOT_ADD_WAIT and w.done == []
    w.guest(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=500, result=1))
    assert w.done == [None] and w.vsp.state is DmState.IDLE
    assert w.part.visible_pages == RAM_PAGES + 500 and w.part.assigned_pages == RAM_PAGES + 500
    assert w.vsp.ram.contains(HOT_ADD_ALIGN, 500)


def test_a_goal_changed_during_a_transaction_is_taken_up_when_it_ends(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES - 1000)
    w.vsp.set_goal(RAM_PAGES)  # while the balloon request waits for the guest
    assert len(w.sent) == 1 and w.vsp.state is DmState.BALLOON_WAIT
    w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x3000, 1000)])
    assert w.last().type is T.UNBALLOON_REQUEST and w.vsp.state is DmState.UNBALLOON_WAIT
    w.guest(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
    assert w.done == [None] and w.part.assigned_pages == RAM_PAGES


def test_a_guest_at_its_floor_ends_the_goal_with_the_reason(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES - 1000)
    w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=1), ranges=[PageRange(0x3000, 10)])
    w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse())  # no ranges: at its minimum
    assert w.vsp.goal is None and w.vsp.state is DmState.IDLE
    assert w.done and w.done[0] is not None and "floor" in w.done[0]
    assert w.vsp.goal_error == w.done[0] and w.part.assigned_pages == RAM_PAGES - 10


def test_an_unanswered_transaction_times_out_on_the_clock_and_ends_the_goal(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES - 1000)
    w.now = 9.9
    w.vsp.tick()
    assert w.vsp.state is DmState.BALLOON_WAIT and w.done == []
    w.now = 10.0
    w.vsp.tick()
    assert w.vsp.state is DmState.IDLE and w.vsp.counters["timeouts"] == 1
    assert w.done and "did not answer (balloon 1000 pages) in 10.0 s" in str(w.done[0])


def test_a_partial_hot_add_ends_the_goal_and_hot_add_stays_off(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES + 1000)
    w.guest(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=100, result=1))
    assert w.vsp.hot_add_disabled and w.vsp.goal is None
    assert "fewer pages than offered" in str(w.vsp.goal_error)
    w.vsp.set_goal(RAM_PAGES + 2000)
    assert w.vsp.state is DmState.IDLE and "cannot hot-add" in str(w.vsp.goal_error)


def test_a_guest_without_hot_add_is_only_unballooned() -> None:
    w = World(hot_add=0)
    try:
        w.vsp.set_goal(RAM_PAGES - 100)
        w.guest(T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x3000, 100)])
        w.vsp.set_goal(RAM_PAGES + 100)
        w.guest(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())
        assert w.part.assigned_pages == RAM_PAGES and w.vsp.goal is None
        assert "cannot hot-add" in str(w.vsp.goal_error)
        assert [m.type for m in w.sent].count(T.MEM_HOT_ADD_REQUEST) == 0
    finally:
        w.close()


def test_a_guest_that_starts_over_ends_the_goal(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES - 1000)
    w.vsp.reset("the guest rebooted")
    assert w.vsp.goal is None and "the guest rebooted" in str(w.vsp.goal_error)
    assert w.vsp.state is DmState.VERSION


def test_the_goal_already_met_needs_no_message(w: World) -> None:
    w.vsp.set_goal(RAM_PAGES)
    assert w.sent == [] and w.done == [None]


def test_the_waiting_states_are_declared_once() -> None:
    assert {s for s in DmState if s.waiting} == WAITING
    assert WAITING == {
        DmState.BALLOON_WAIT,
        DmState.UNBALLOON_WAIT,
        DmState.HOT_ADD_WAIT,
        DmState.HOT_REMOVE_WAIT,
    }
