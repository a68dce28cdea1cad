"""The VSP and the memory manager keep one story: whatever sequence of balloons, unballoons and
guest mistakes, the pages the host released are exactly the pages the guest ballooned, and the
host's accounting balances."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import DmState, DynamicMemoryVsp
from pyhv.memory.manager import PAGE_SIZE, MemfdRegion, MemoryManager
from pyhv.memory.ranges import PageRange, RangeSet

pytestmark = pytest.mark.simulation

PAGES = 4096  # 16 MiB of guest RAM
KERNEL = 16  # pages the guest never balloons


class BalloonStory(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.region = MemfdRegion(0, PAGES * PAGE_SIZE)
        self.mm = MemoryManager(32 * PAGES * PAGE_SIZE, reserve_bytes=PAGES * PAGE_SIZE)
        self.mm.add_partition("vm", [self.region])
        self.vsp = DynamicMemoryVsp(
            RangeSet([(0, PAGES)]),
            lambda raw: True,
            on_ballooned=lambda rs: self.mm.release("vm", rs),
        )
        self.vsp.MAX_CONSECUTIVE_BAD = 10**9  # this guest's garbage is interleaved with sense
        self.guest_free = RangeSet([(KERNEL, PAGES - KERNEL)])
        self.asked = 0
        self.unballooning: list[PageRange] = []
        self.send(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10))
        self.send(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1))

    def send(self, mtype: T, body: object, **kw: object) -> None:
        self.vsp.on_message(p.encode(mtype, body, **kw), 0)  # type: ignore[arg-type]

    def teardown(self) -> None:
        self.region.close()

    @precondition(lambda self: self.vsp.state is DmState.IDLE)
    @rule(n=st.integers(1, 1500))
    def host_balloons(self, n: int) -> None:
        self.vsp.balloon(n)
        self.asked = n

    @precondition(lambda self: self.vsp.state is DmState.BALLOON_WAIT)
    @rule(
        share=st.floats(0, 1),
        parts=st.integers(1, 3),
        lie=st.sampled_from(["none", "outside", "again", "too_many"]),
    )
    def guest_answers_the_balloon(self, share: float, parts: int, lie: str) -> None:
        taken = self.guest_free.take(int(self.asked * share))
        split = RangeSet()
        for r in taken:  # the guest hands its pages out in small runs
            s = r.start
            while s < r.end:
                n = min(r.end - s, 1 + (s % 7) * 40)
                split.add(s, n)
                s += n
        ranges = list(split)
        if lie == "outside":
            ranges.append(PageRange(PAGES + 5, 3))
        elif lie == "again" and self.vsp.ballooned.pages:
            first = next(iter(self.vsp.ballooned))
            ranges.append(PageRange(first.start, 1))
        elif lie == "too_many":
            ranges.append(PageRange(0, self.asked + 1))
        chunks = [ranges[i::parts] for i in range(parts)]
        for i, chunk in enumerate(chunks):
            more = int(i + 1 < len(chunks))
            self.send(T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=more), ranges=chunk)
        assert self.vsp.state is DmState.IDLE

    @precondition(lambda self: self.vsp.state is DmState.IDLE and self.vsp.ballooned.pages > 0)
    @rule(n=st.integers(1, 1500))
    def host_unballoons(self, n: int) -> None:
        back = self.mm.pick_ballooned("vm", n)
        self.mm.reclaim("vm", back)  # back them before the guest may touch them
        self.vsp.unballoon(back)
        self.unballooning = back

    @precondition(lambda self: self.vsp.state is DmState.UNBALLOON_WAIT)
    @rule()
    def guest_answers_the_unballoon(self) -> None:
        for r in self.unballooning:
            self.guest_free.add(*r)
        self.unballooning = []
        self.send(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse())

    @rule(junk=st.binary(max_size=40))
    def guest_sends_junk(self, junk: bytes) -> None:
        self.vsp.on_message(junk, 0)

    @rule(committed=st.integers(0, 2**64 - 1))
    def guest_reports_status(self, committed: int) -> None:
        self.send(T.STATUS_REPORT, p.DmStatus(num_committed=committed))

    @invariant()
    def the_host_released_exactly_what_the_guest_ballooned(self) -> None:
        released = self.mm.partitions["vm"].ballooned
        pending = sum(r.count for r in self.unballooning)
        assert self.vsp.ballooned.pages == released.pages + pending
        for r in released:
            assert self.vsp.ballooned.contains(*r)
            assert not self.guest_free.overlaps(*r)
        assert all(self.vsp.ram.contains(*r) for r in self.vsp.ballooned)

    @invariant()
    def the_hosts_accounting_balances(self) -> None:
        part = self.mm.partitions["vm"]
        assert (
            self.mm.free_pages + part.assigned_pages == self.mm.budget_pages - self.mm.reserve_pages
        )
        assert part.assigned_pages == PAGES - part.ballooned.pages


TestBalloonStory = BalloonStory.TestCase
TestBalloonStory.settings = settings(
    max_examples=25, stateful_step_count=25, deadline=None, suppress_health_check=list(HealthCheck)
)
