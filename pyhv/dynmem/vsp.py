"""The Dynamic Memory VSP: the host side of the protocol as a state machine.

VERSION -> CAPS -> IDLE; from IDLE one transaction at a time: BALLOON_WAIT (the guest answers a
balloon request with one or more responses of page ranges), UNBALLOON_WAIT (one or more requests
with ranges, one response), HOT_ADD_WAIT, HOT_REMOVE_WAIT (protocol 2.0: the guest names the
ranges it took offline, over one or more responses; docs/dynamic-memory.md). Status reports
arrive in any state after CAPS. Every value from the guest is checked; a wrong message is
refused, logged and counted and the VSP goes on; a guest that sends nothing but wrong messages
gets its channel stopped.

The *goal* is part of the state machine, as QEMU's hv-balloon handles its target: `set_goal(n)`
records the pages the VM should be assigned, and whenever the VSP is IDLE with a goal it takes
the next step (balloon to go down; unballoon first, then hot-add, to go up), until the goal is
reached or cannot be (the guest is at its floor, hot-add is off, no answer in `op_timeout`:
`goal_error` says why). A goal set while a transaction is in flight is taken up when it ends.
`tick()` gives up a transaction the guest did not answer in time; nothing here runs a thread.

After a timeout the VSP's books say what the host did, so they agree with the memory manager's:
an unballoon the guest left unanswered gave the pages back all the same (the host reclaimed them
before it asked, and a late guest may use them at any time), so they leave `ballooned` and wait
in `unanswered` until a late response or a reset; a hot-add left unanswered mapped its region,
so the range joins `ram`. A reset (reopened channel) empties both.

The VSP does protocol bookkeeping only: it reports ballooned ranges to `on_ballooned` (the worker
hands them to the memory manager to release); for the goal's steps it asks its owner to
`reclaim` pages *before* they are unballooned and to `map_hot_add` a region before it is offered.

Free-page hints (pyhv's extension, offered in the capabilities response): in any negotiated
state the guest may name runs of whole free 2 MiB blocks; each range is checked (2 MiB-aligned,
RAM of this partition, not ballooned, not named twice, not a page the host uses: a VMBus ring,
the check hot-remove makes), a bad one is refused, logged and counted,
the good ones go to `on_hinted` (the owner discards the memory behind them) and one response says
how many pages were discarded and how many ranges refused.

`save()` and `restore(state)` carry the VSP across a live migration: a :class:`DmVspState`,
versioned, whose `restore` checks every value against this VSP's RAM and protocol before it
changes anything.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from pyhv import wire
from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.status import MAX_PAGES, MemoryStatus
from pyhv.memory.ranges import PageRange, RangeError, RangeSet
from pyhv.trace.events import DmEvent, Event
from pyhv.vmbus.vsp import Vsp, VspError, serialized

#: Ranges per host message: hdr + 8 + 8*n <= 4096 (as the guest packs its responses).
MAX_RANGES_PER_MESSAGE = (p.MAX_MESSAGE - ctypes.sizeof(p.DmUnballoonRequest)) // 8
#: Pages asked per balloon or hot-remove request at most (QEMU HV_BALLOON_HR_CHUNK_PAGES:
#: Windows refuses more).
MAX_BALLOON_PAGES = 585_728
#: Host messages waiting for room in the guest's ring beyond which a guest request that would
#: queue another reply is refused: a guest that asks without reading cannot grow the outbox.
MAX_UNREAD_REPLIES = 16
#: Why a range the guest names (to hot-remove, or as free) that holds pages the host itself
#: uses is refused: the memory behind it would go while the host still reads and writes it.
HOST_USED = "pages the host uses (a VMBus ring): the guest cannot give them"
#: A free-page hint names whole 2 MiB blocks (as Linux reports pages of order 9 and up).
HINT_BLOCK_PAGES = 512
#: Seconds the guest has to answer one transaction before the host gives up on it.
DEFAULT_OP_TIMEOUT = 60.0
MIB_PAGES = (1 << 20) // 4096


class DmState(Enum):
    VERSION = auto()
    CAPS = auto()
    IDLE = auto()
    BALLOON_WAIT = auto()
    UNBALLOON_WAIT = auto()
    HOT_ADD_WAIT = auto()
    STOPPED = auto()
    HOT_REMOVE_WAIT = auto()

    @property
    def waiting(self) -> bool:
        """A host request waits for the guest's answer (one transaction in flight)."""
        return self in WAITING


#: The states with a transaction in flight: declared once, here.
WAITING = frozenset(
    {DmState.BALLOON_WAIT, DmState.UNBALLOON_WAIT, DmState.HOT_ADD_WAIT, DmState.HOT_REMOVE_WAIT}
)

_S = DmState
_TRANSITIONS: dict[Enum, frozenset[Enum]] = {
    _S.VERSION: frozenset({_S.CAPS}),
    _S.CAPS: frozenset({_S.IDLE}),
    _S.IDLE: frozenset({_S.BALLOON_WAIT, _S.UNBALLOON_WAIT, _S.HOT_ADD_WAIT, _S.HOT_REMOVE_WAIT}),
    _S.HOT_REMOVE_WAIT: frozenset({_S.IDLE}),
    _S.BALLOON_WAIT: frozenset({_S.IDLE}),
    _S.UNBALLOON_WAIT: frozenset({_S.IDLE}),
    _S.HOT_ADD_WAIT: frozenset({_S.IDLE}),
    _S.STOPPED: frozenset({_S.VERSION}),
}
# A reopened channel (guest reboot) starts over from any state.
_TRANSITIONS = {k: v | {_S.VERSION} for k, v in _TRANSITIONS.items()}


@dataclass(frozen=True)
class GuestCaps:
    balloon: bool
    hot_add: bool
    hot_add_alignment_mib: int
    min_page_cnt: int
    max_page_number: int
    #: DM 2.0: the guest can give memory back offline (DM_MEM_HOT_REMOVE_REQUEST)
    hot_remove: bool = False


def _noop(*_: object) -> None:
    return None


def _no_host_memory(*_: object) -> Any:
    raise VspError("this VSP was built without a memory owner: it cannot move towards a goal")


VSP_STATE_VERSION = 2  # 2: caps.hot_remove, the HOT_REMOVE_WAIT state


def _ranges_from_wire(what: str, value: object) -> tuple[PageRange, ...]:
    if not isinstance(value, list) or not all(
        isinstance(r, list) and len(r) == 2 and all(type(v) is int for v in r) for r in value
    ):
        raise ValueError(f"DM VSP state: {what} {value!r} is not a list of [start, count]")
    return tuple(PageRange(s, n) for s, n in value)


@dataclass(frozen=True)
class DmVspState:
    """What the DM VSP carries across a live migration (version VSP_STATE_VERSION)."""

    version: int
    state: str  #: a DmState name
    protocol: int | None  #: the negotiated protocol version
    caps: GuestCaps | None
    hot_add_disabled: bool
    trans_id: int
    stop_reason: str | None
    ram: tuple[PageRange, ...]
    ballooned: tuple[PageRange, ...]
    counters: Mapping[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> DmVspState:
        """The shape (types, declared by the fields); restore() checks the values."""
        st = wire.from_wire(cls, d, "DM VSP state")
        check_state_version(st.version)
        return st


def check_state_version(version: int) -> None:
    """ValueError unless `version` is the DmVspState version this pyhv writes."""
    if version != VSP_STATE_VERSION:
        raise ValueError(
            f"DM VSP state version {version!r} is not {VSP_STATE_VERSION}: the hosts run "
            "different pyhv releases"
        )


class DynamicMemoryVsp(Vsp[DmState]):
    """Host side of one partition's Dynamic Memory channel.

    `ram` holds the partition's guest RAM as page ranges (ballooned ranges must lie in it;
    pages the guest hot-adds are added to it). `assigned_pages()` gives the pages the host backs,
    for the pressure in status reports.
    """

    TRANSITIONS = _TRANSITIONS
    STOPPED = DmState.STOPPED

    def __init__(
        self,
        ram: RangeSet,
        send: Callable[[bytes], bool] | None = None,
        *,
        assigned_pages: Callable[[], int] | None = None,
        on_status: Callable[[MemoryStatus], object] = _noop,
        on_ballooned: Callable[[list[PageRange]], object] = _noop,
        on_balloon_done: Callable[[int], object] = _noop,
        on_unballoon_done: Callable[[list[PageRange]], object] = _noop,
        on_hot_add_done: Callable[[PageRange, int, bool], object] = _noop,
        on_stop: Callable[[str], object] | None = None,
        on_reset: Callable[[list[PageRange]], object] = _noop,
        on_hinted: Callable[[list[PageRange]], int] | None = None,
        on_hot_removed: Callable[[list[PageRange]], object] | None = None,
        on_hot_remove_done: Callable[[int], object] = _noop,
        host_pages: Callable[[], Iterable[PageRange]] = tuple,
        reclaim: Callable[[list[PageRange]], object] = _no_host_memory,
        map_hot_add: Callable[[int, int], PageRange] = _no_host_memory,
        on_goal_done: Callable[[str | None], object] = _noop,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        name: str = "dynmem",
    ) -> None:
        super().__init__(name, DmState.VERSION, send, on_stop)
        self.ram = ram
        self.ballooned = RangeSet()
        #: Pages of an unballoon the guest did not answer in time: the host backs them (it
        #: reclaimed them first), the guest may or may not have taken them back yet.
        self.unanswered = RangeSet()
        self.version: int | None = None
        self.caps: GuestCaps | None = None
        self.last_status: MemoryStatus | None = None
        self.hot_add_disabled = False
        self._assigned = assigned_pages
        self._on_status = on_status
        self._on_ballooned = on_ballooned
        self._on_balloon_done = on_balloon_done
        self._on_unballoon_done = on_unballoon_done
        self._on_hot_add_done = on_hot_add_done
        self._on_reset = on_reset
        #: Free-page hints are offered only with an owner that discards the memory.
        self._on_hinted = on_hinted
        #: Hot-remove is offered (caps response hot_remove=1) only with an owner that takes the
        #: memory back from the guest (pyhv.memory.manager.MemoryManager.hot_remove).
        self._on_hot_removed = on_hot_removed
        self._on_hot_remove_done = on_hot_remove_done
        self._hot_remove_clear()
        self._hr_large = False
        #: Guest pages the host itself uses (the VMBus rings): never the guest's to give back.
        self._host_pages = host_pages
        self._trans_id = 0
        self._balloon_asked = 0
        self._balloon_got = 0
        self._unballooning: list[PageRange] = []
        self._hot_add: PageRange | None = None
        #: The goal: pages the VM should be assigned (None: none pending).
        self.goal: int | None = None
        #: Why the last goal was given up (None: reached, or none yet).
        self.goal_error: str | None = None
        #: The transaction in flight, in words (None when there is none).
        self.operation: str | None = None
        self.op_timeout = op_timeout
        self._reclaim = reclaim
        self._map_hot_add = map_hot_add
        self._on_goal_done = on_goal_done
        self._clock = clock
        self._deadline = 0.0
        self._goal_blocked: str | None = None  # why the goal cannot advance any further

    def on_bind(self, channel: object) -> None:
        if self.state is not DmState.VERSION or self.ballooned.pages:
            self.reset("a new channel: the guest starts over")

    @serialized
    def reset(self, why: str) -> list[PageRange]:
        """Start over (guest reboot, reopened channel). The guest's balloon is gone: the ranges
        it held go to `on_reset` (and are returned) so the host reclaims them. Hot-added memory
        stays in `ram`: the guest keeps using it until the partition restarts (as Hyper-V)."""
        for r in self._unballooning:  # already reclaimed by the host when it asked
            self.ballooned.remove(*r)
        held = list(self.ballooned)
        self.ballooned = RangeSet()
        self.unanswered = RangeSet()  # the guest's balloon is gone: they are its own for sure
        self.hot_add_disabled = False
        self.version = None
        self.caps = None
        self._outbox.clear()
        self._bad_in_a_row = 0
        self.stop_reason = None
        self._unballooning, self._hot_add = [], None
        self._hot_remove_clear()
        self._balloon_asked = self._balloon_got = 0
        self.counters["resets"] += 1
        self.operation = None
        if self.state is not DmState.VERSION:
            self._to(DmState.VERSION, why)
        self._on_reset(held)
        self._give_up(f"Dynamic Memory stopped in the guest: {why}")
        return held

    @serialized
    def stop(self, why: str) -> None:
        super().stop(why)
        self.operation = None
        self._give_up(f"Dynamic Memory stopped in the guest: {why}")

    # -- host requests -------------------------------------------------------------------------

    def _next_trans_id(self) -> int:
        self._trans_id = (self._trans_id + 1) & 0xFFFFFFFF
        return self._trans_id

    def _require_idle(self, what: str) -> None:
        if self.state is not DmState.IDLE:
            raise VspError(f"{what} needs the VSP idle; it is in {self.state.name}: wait")

    @serialized
    def balloon(self, pages: int) -> None:
        """Ask the guest to give back `pages` pages (DM_BALLOON_REQUEST)."""
        self._require_idle("balloon")
        assert self.caps is not None
        if not self.caps.balloon:
            raise VspError("the guest did not report the balloon capability")
        if not 0 < pages <= MAX_BALLOON_PAGES:
            raise VspError(f"balloon of {pages} pages: ask 1..{MAX_BALLOON_PAGES} at a time")
        self._balloon_asked, self._balloon_got = pages, 0
        self.post(
            p.encode(
                T.BALLOON_REQUEST, p.DmBalloon(num_pages=pages), trans_id=self._next_trans_id()
            )
        )
        self._start(DmState.BALLOON_WAIT, f"balloon {pages} pages")

    @serialized
    def unballoon(self, ranges: Iterable[PageRange | tuple[int, int]]) -> None:
        """Give ballooned pages back to the guest (DM_UNBALLOON_REQUEST, several if needed).
        Reclaim them from the memory manager first."""
        self._require_idle("unballoon")
        pieces: list[PageRange] = []
        check = RangeSet()
        for r in ranges:
            start, count = r
            if count <= 0 or not self.ballooned.contains(start, count):
                raise VspError(f"pages {start:#x}+{count} are not in the guest's balloon")
            check.add(start, count)  # RangeError if listed twice
            while count:
                n = min(count, p.MAX_RANGE_PAGES)
                pieces.append(PageRange(start, n))
                start, count = start + n, count - n
        if not pieces:
            raise VspError("unballoon of no pages")
        chunks = [
            pieces[i : i + MAX_RANGES_PER_MESSAGE]
            for i in range(0, len(pieces), MAX_RANGES_PER_MESSAGE)
        ]
        for i, chunk in enumerate(chunks):
            more = int(i + 1 < len(chunks))
            body = p.DmUnballoonRequest(more_pages=more)
            self.post(
                p.encode(T.UNBALLOON_REQUEST, body, ranges=chunk, trans_id=self._next_trans_id())
            )
        self._unballooning = pieces
        self._start(
            DmState.UNBALLOON_WAIT, f"unballoon {check.pages} pages in {len(chunks)} messages"
        )

    @serialized
    def hot_add(self, range_: PageRange, region: PageRange | None = None) -> None:
        """Ask the guest to add `range_` pages (in `region`, if given) - mapped beforehand."""
        self._require_idle("hot-add")
        assert self.caps is not None
        if not self.caps.hot_add:
            raise VspError("the guest did not report the hot-add capability")
        if self.hot_add_disabled:
            raise VspError("hot-add failed permanently for this guest; use unballoon only")
        if range_.count <= 0 or self.ram.overlaps(*range_):
            raise VspError(f"hot-add range {range_} is empty or overlaps the guest's RAM")
        body: p.DmHotAdd | p.DmHotAddWithRegion
        if region is None:
            body = p.DmHotAdd()
        else:
            if not (region.start <= range_.start and range_.end <= region.end):
                raise VspError(f"hot-add range {range_} is not inside its region {region}")
            body = p.DmHotAddWithRegion()
            body.region.start_page, body.region.page_cnt = region
        body.range.start_page, body.range.page_cnt = range_
        self.post(p.encode(T.MEM_HOT_ADD_REQUEST, body, trans_id=self._next_trans_id()))
        self._hot_add = range_
        self._start(DmState.HOT_ADD_WAIT, f"hot-add {range_.count} pages at {range_.start:#x}")

    # -- hot-remove (protocol 2.0) ---------------------------------------------------------------

    @property
    def hot_remove_offered(self) -> bool:
        """The guest reported hot-remove and this host answered that it uses it."""
        return self.caps is not None and self.caps.hot_remove and self._on_hot_removed is not None

    @serialized
    def hot_remove(self, pages: int, large: bool = True) -> None:
        """Ask the guest to give `pages` pages back offline (DM_MEM_HOT_REMOVE_REQUEST): it
        answers with the ranges it vacated, over one or more responses (more_pages). `large`
        sets DM_REMOVE_QOS_LARGE: ranges of whole 2 MiB blocks only."""
        self._require_idle("hot-remove")
        if not self.hot_remove_offered:
            raise VspError(
                "the guest did not report the hot-remove capability (protocol 2.0), or this host "
                "has no memory owner to take the memory back"
            )
        if not 0 < pages <= MAX_BALLOON_PAGES:
            raise VspError(f"hot-remove of {pages} pages: ask 1..{MAX_BALLOON_PAGES} at a time")
        self._hot_remove_clear()
        self._hr_asked, self._hr_large = pages, large
        body = p.DmHotRemove(
            virtual_node=0, page_count=pages, qos_flags=p.QOS_LARGE if large else 0
        )
        self.post(p.encode(T.MEM_HOT_REMOVE_REQUEST, body, trans_id=self._next_trans_id()))
        self.counters["hot_remove_requests"] += 1
        self._start(DmState.HOT_REMOVE_WAIT, f"hot-remove {pages} pages")

    def _hot_remove_clear(self) -> None:
        self._hr_asked = self._hr_got = 0
        self._hr_named = RangeSet()

    def _hot_remove_response(self, msg: p.Message) -> None:
        if self.state is not DmState.HOT_REMOVE_WAIT:
            self.counters["hot_remove_unasked"] += 1
            return self.refuse(
                f"MEM_HOT_REMOVE_RESPONSE with no hot-remove request outstanding (state "
                f"{self.state.name}): its {len(msg.ranges)} ranges are ignored"
            )
        good: list[PageRange] = []
        busy = self._host_used(msg)
        for r in msg.ranges:
            why = self._bad_hot_remove_range(r, busy)
            if why:
                self.counters["bad_ranges"] += 1
                self.counters["hot_remove_bad_ranges"] += 1
                self.refuse(f"hot-remove range {r.start:#x}+{r.count}: {why}")
                continue
            self._hr_named.add(*r)
            self.ram.remove(*r)
            self._hr_got += r.count
            good.append(r)
        result = msg.body.result
        if result not in (0, 1):
            self.counters["bad_ranges"] += 1
            self.refuse(f"hot-remove response result={result}: 1 (success) or 0 (failure)")
        if good:  # taken from `ram` above: the owner takes them even if the channel stopped
            assert self._on_hot_removed is not None
            self._on_hot_removed(good)
            self.counters["hot_removed_pages"] += sum(r.count for r in good)
        if self.stopped:
            return
        if len(good) == len(msg.ranges) and result in (0, 1):
            self.accepted()
        if not msg.body.more_pages:
            got, asked = self._hr_got, self._hr_asked
            self._hot_remove_clear()
            self._done(f"hot-removed {got} of {asked} pages")
            self._on_hot_remove_done(got)
            self._advance()

    def _bad_hot_remove_range(self, r: PageRange, busy: RangeSet) -> str:
        if r.count == 0:
            return "no pages"
        if self._hr_large and (r.start % HINT_BLOCK_PAGES or r.count % HINT_BLOCK_PAGES):
            return "not whole 2 MiB blocks, which the request asked for (DM_REMOVE_QOS_LARGE)"
        if self._hr_named.overlaps(*r):
            return "named twice"
        if self.ballooned.overlaps(*r) or self.unanswered.overlaps(*r):
            return "ballooned: the host holds those pages already"
        if not self.ram.contains(*r):
            return "not RAM of this partition (outside it, or removed already)"
        if busy.overlaps(*r):
            return HOST_USED
        if self._hr_got + r.count > self._hr_asked:
            return f"more than the {self._hr_asked} pages asked"
        return ""

    def _start(self, waiting: DmState, what: str) -> None:
        self.operation = what
        self._deadline = self._clock() + self.op_timeout
        self._to(waiting, what)

    def _done(self, why: str) -> None:
        """The transaction ended: IDLE, and on towards the goal."""
        self.operation = None
        self._to(DmState.IDLE, why)

    @serialized
    def send_info_max_page_count(self, pages: int) -> None:
        """DM_INFO_MESSAGE with the maximum dynamic page count (protocol 1.0 and later)."""
        if self.version is None or self.version < p.Version.WIN8:
            raise VspError("the info message needs protocol version 1.0 (WIN8) or later")
        info = p.info_max_page_count(pages)
        self.post(
            p.encode(T.INFO_MESSAGE, p.DmInfoMsg(), info=info, trans_id=self._next_trans_id())
        )
        self.counters["info_sent"] += 1

    @serialized
    def timeout(self) -> None:
        """The guest did not answer the current transaction in time: give up on it (and on
        the goal it was a step of)."""
        if self.state.waiting:
            what = self.operation or self.state.name
            self.counters["timeouts"] += 1
            self._settle_unanswered()
            self._done(f"no answer in {self.state.name}")
            self._give_up(f"the guest did not answer ({what}) in {self.op_timeout} s")

    def _settle_unanswered(self) -> None:
        """The books after a transaction the guest left unanswered, as the host has done it:
        an unballoon's pages were reclaimed before the request (the guest owns them whenever it
        reads it), a hot-add's region was mapped before the offer."""
        if self.state is DmState.UNBALLOON_WAIT:
            for r in self._unballooning:
                self.ballooned.remove(*r)
                self.unanswered.add(*r)
            self.counters["unanswered_unballoon_pages"] += sum(r.count for r in self._unballooning)
            self._unballooning = []
        elif self.state is DmState.HOT_ADD_WAIT and self._hot_add is not None:
            if not self.ram.overlaps(*self._hot_add):
                self.ram.add(*self._hot_add)
            self.counters["unanswered_hot_add_pages"] += self._hot_add.count
            self._hot_add = None
        elif self.state is DmState.HOT_REMOVE_WAIT:  # what it named so far is taken already
            self._hot_remove_clear()

    @property
    def unballooning(self) -> list[PageRange]:
        """The ranges of the unballoon in flight (the host has reclaimed them already)."""
        return list(self._unballooning)

    @serialized
    def tick(self) -> None:
        """Called now and then by the owner: a transaction past its deadline times out."""
        if self.state.waiting and self._clock() >= self._deadline:
            self.timeout()

    # -- the goal ------------------------------------------------------------------------------

    @serialized
    def set_goal(self, pages: int) -> None:
        """Move the VM's assigned memory to `pages`, one transaction at a time (see the module
        docstring). The latest goal wins; setting the same goal again retries it."""
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
            raise VspError(f"goal {pages!r} must be a page count >= 0")
        self.goal = pages
        self.goal_error = None
        self._goal_blocked = None
        self._advance()

    def _give_up(self, why: str) -> None:
        if self.goal is None:
            return
        self.log.warning("%s: stopped short of %d pages: %s", self.name, self.goal, why)
        self.goal, self.goal_error, self._goal_blocked = None, why, None
        self._on_goal_done(why)

    def _advance(self) -> None:
        """IDLE with a goal: the next step towards it, or the goal is reached / given up."""
        if self.goal is None or self.state is not DmState.IDLE:
            return
        goal = self.goal
        assigned = self._assigned() if self._assigned is not None else 0
        try:
            if self._goal_blocked is not None:
                self._give_up(self._goal_blocked)
            elif assigned == goal:
                self.goal = None
                self._on_goal_done(None)
            elif assigned > goal:
                self._balloon_step(assigned - goal)
            elif self.ballooned.pages:
                self._unballoon_step(goal - assigned)
            else:
                self._hot_add_step(goal - assigned)
        except Exception as e:  # noqa: BLE001 - recorded in goal_error; the VSP goes on
            self.log.exception("%s: a step towards %d pages failed", self.name, goal)
            self._give_up(f"{type(e).__name__}: {e}")

    def _balloon_step(self, pages: int) -> None:
        assert self.caps is not None
        if not self.caps.balloon:
            return self._give_up("the guest cannot balloon (capability off)")
        self.balloon(min(pages, MAX_BALLOON_PAGES))

    def _unballoon_step(self, pages: int) -> None:
        ranges = RangeSet(self.ballooned).take(pages)  # highest first
        self._reclaim(ranges)  # the host backs them before the guest may touch them
        self.unballoon(ranges)

    def _hot_add_step(self, pages: int) -> None:
        caps = self.caps
        assert caps is not None
        if not caps.hot_add or self.hot_add_disabled:
            return self._give_up("the guest cannot hot-add memory (capability off or disabled)")
        rng = self._map_hot_add(pages, max(caps.hot_add_alignment_mib, 2) * MIB_PAGES)
        self.hot_add(rng, rng)

    # -- save / restore --------------------------------------------------------------------------

    @serialized
    def save(self) -> DmVspState:
        """The VSP's state; refused while a transaction is in flight (it cannot be carried)."""
        if self.state.waiting:
            raise VspError(
                f"a Dynamic Memory transaction is in flight ({self.operation or self.state.name}):"
                " save once it is done"
            )
        return DmVspState(
            VSP_STATE_VERSION,
            self.state.name,
            self.version,
            self.caps,
            self.hot_add_disabled,
            self._trans_id,
            self.stop_reason,
            tuple(self.ram),
            tuple(self.ballooned),
            dict(self.counters),
        )

    def check(self, st: DmVspState) -> None:
        """Whether `st` can be restored into this VSP; ValueError naming the value if not."""
        check_state_version(st.version)
        state = DmState.__members__.get(st.state)
        if state is None or state.waiting:
            raise ValueError(
                f"DM VSP state {st.state!r} cannot be restored: only "
                f"{sorted(s.name for s in DmState if not s.waiting)} can (a transaction in "
                "flight is not carried)"
            )
        if st.protocol is not None and not p.Version.WIN7 <= st.protocol <= p.Version.WIN10:
            raise ValueError(f"DM VSP state: protocol version {st.protocol:#x} is not 0.3..2.0")
        needs = {DmState.VERSION: (False, False), DmState.CAPS: (True, False)}
        proto, caps = needs.get(state, (True, True))
        if state is not DmState.STOPPED and (
            (st.protocol is not None) != proto or (st.caps is not None) != caps
        ):
            raise ValueError(
                f"DM VSP state {st.state}: protocol {st.protocol!r} and caps {st.caps!r} do not "
                "fit it (VERSION has neither, CAPS a protocol, IDLE both)"
            )
        c = st.caps
        if c is not None and not (
            c.hot_add_alignment_mib in {1 << n for n in range(16)}
            and 0 <= c.min_page_cnt <= (1 << 64) - 1
            and 0 <= c.max_page_number <= (1 << 64) - 1
        ):
            # what a CAPABILITIES_REPORT can say: a 4-bit log2 alignment in MiB, two u64 counts
            raise ValueError(
                f"DM VSP state: caps {c!r} are not capabilities a guest can report "
                "(alignment 2^0..2^15 MiB, page counts of 64 bits)"
            )
        if not 0 <= st.trans_id <= 0xFFFFFFFF:
            raise ValueError(f"DM VSP state: transaction id {st.trans_id} is not 32 bits")
        if list(st.ram) != list(self.ram):
            raise ValueError(
                f"DM VSP state: its RAM {list(st.ram)} is not this partition's {list(self.ram)}"
            )
        balloon = RangeSet()
        for r in st.ballooned:
            if r.count <= 0 or not self.ram.contains(*r) or balloon.overlaps(*r):
                raise ValueError(
                    f"DM VSP state: ballooned pages {r.start:#x}+{r.count} are empty, outside "
                    "this partition's RAM or listed twice"
                )
            balloon.add(*r)
        bad = {k: v for k, v in st.counters.items() if v < 0}
        if bad:
            raise ValueError(f"DM VSP state: counters {bad} are negative")

    @serialized
    def restore(self, st: DmVspState) -> None:
        """Go on where `st` left off (checked first: nothing changes if it does not fit)."""
        self.check(st)
        self._state = DmState[st.state]  # the state as saved: not a transition of this guest
        self.version = st.protocol
        self.caps = st.caps
        self.hot_add_disabled = st.hot_add_disabled
        self._trans_id = st.trans_id
        self.stop_reason = st.stop_reason
        self.ballooned = RangeSet(st.ballooned)
        self.counters.update(st.counters)
        self.log.info("%s: restored in %s", self.name, st.state)

    # -- guest messages --------------------------------------------------------------------------

    @serialized
    def on_message(self, payload: bytes, trans_id: int) -> None:
        try:
            msg = p.decode(payload)
        except p.DmDecodeError as e:
            self.refuse(str(e))
            return
        self.counters[f"rx_{msg.type.name}"] += 1
        handler = {
            T.VERSION_REQUEST: self._version,
            T.CAPABILITIES_REPORT: self._caps,
            T.STATUS_REPORT: self._status,
            T.BALLOON_RESPONSE: self._balloon_response,
            T.UNBALLOON_RESPONSE: self._unballoon_response,
            T.MEM_HOT_ADD_RESPONSE: self._hot_add_response,
            T.FREE_PAGE_HINT: self._free_page_hint,
            T.MEM_HOT_REMOVE_RESPONSE: self._hot_remove_response,
        }.get(msg.type)
        if handler is None:
            self.refuse(f"{msg.type.name} is not a message the guest sends")
            return
        handler(msg)

    def trace_message(self, direction: str, payload: bytes) -> list[Event]:
        """The DM message in a packet, decoded field by field for the flight recorder."""
        try:
            msg = p.decode(payload)
        except p.DmDecodeError:
            return []  # on_message refuses and counts it
        return [
            DmEvent(
                time.time(),
                -1,
                direction,
                msg.type.name,
                msg.trans_id,
                dict(msg.fields()),
                [[r[0], r[1]] for r in msg.ranges],
            )
        ]

    def _wrong_state(self, msg: p.Message) -> None:
        self.refuse(f"{msg.type.name} in state {self.state.name}")

    def _version(self, msg: p.Message) -> None:
        if self.state is not DmState.VERSION:
            return self._wrong_state(msg)
        if self.outbox_len >= MAX_UNREAD_REPLIES:
            self.counters["unread_replies"] += 1
            return self.refuse(
                f"VERSION_REQUEST while {self.outbox_len} replies wait for the guest to read its ring"
            )
        version = msg.body.version
        ok = p.Version.WIN7 <= version <= p.Version.WIN10  # as QEMU: 0.3 <= v <= 2.0
        body = p.DmVersionResponse(is_accepted=int(ok))
        self.post(p.encode(T.VERSION_RESPONSE, body, trans_id=msg.trans_id))
        self.accepted()
        if ok:
            self.version = version
            self._to(DmState.CAPS, f"version {version >> 16}.{version & 0xFFFF} accepted")
        else:
            self.counters["versions_rejected"] += 1

    def _caps(self, msg: p.Message) -> None:
        if self.state is not DmState.CAPS:
            return self._wrong_state(msg)
        b = msg.body
        self.caps = GuestCaps(
            bool(b.balloon),
            bool(b.hot_add),
            1 << b.hot_add_alignment,
            b.min_page_cnt,
            b.max_page_number,
            bool(b.hot_remove) and (self.version or 0) >= p.Version.WIN10,
        )
        body = p.DmCapabilitiesResponse(
            is_accepted=1,
            hot_remove=int(self.caps.hot_remove and self._on_hot_removed is not None),
            suppress_pressure_reports=0,
            free_page_hints=int(self._on_hinted is not None),
        )
        self.post(p.encode(T.CAPABILITIES_RESPONSE, body, trans_id=msg.trans_id))
        self.accepted()
        self._to(DmState.IDLE, f"capabilities {self.caps}")

    def _status(self, msg: p.Message) -> None:
        if self.state in (DmState.VERSION, DmState.CAPS):
            return self._wrong_state(msg)
        b = msg.body
        if b.num_committed > p.MAX_PFN or b.num_avail > p.MAX_PFN:
            self.refuse(
                f"status report with committed={b.num_committed} available={b.num_avail} "
                "pages: more than a 40-bit PFN space"
            )
            return
        # The one place demand is computed: the guest's commit less the host's balloon count
        # (the guest counts its balloon as committed; see pyhv.dynmem.status.MemoryStatus).
        ballooned = self.ballooned.pages
        visible = self.ram.pages
        assigned = self._assigned() if self._assigned is not None else visible - ballooned
        self.last_status = MemoryStatus(
            visible_pages=visible,
            assigned_pages=assigned,
            ballooned_pages=ballooned,
            committed_pages=max(0, b.num_committed - ballooned),
            available_pages=b.num_avail,
            guest_committed_pages=b.num_committed,
            reported_at=time.time(),
            page_file_pages=min(b.page_file_size, MAX_PAGES),
            page_file_writes=b.page_file_writes,
        )
        self.accepted()
        self._on_status(self.last_status)

    def _free_page_hint(self, msg: p.Message) -> None:
        if self.state in (DmState.VERSION, DmState.CAPS):
            return self._wrong_state(msg)
        if self._on_hinted is None:
            return self.refuse("FREE_PAGE_HINT, which this host did not offer")
        if self.outbox_len >= MAX_UNREAD_REPLIES:
            self.counters["unread_replies"] += 1
            return self.refuse(
                f"FREE_PAGE_HINT while {self.outbox_len} replies wait for the guest to read its ring"
            )
        good: list[PageRange] = []
        named = RangeSet()
        busy = self._host_used(msg)
        for r in msg.ranges:
            why = self._bad_hint_range(r, named, busy)
            if why:
                self.counters["hint_refused_ranges"] += 1
                self.refuse(f"free-page hint {r.start:#x}+{r.count}: {why}")
                continue
            named.add(*r)
            good.append(r)
        discarded = 0
        if good:
            try:
                discarded = self._on_hinted(good)
            except Exception as e:  # noqa: BLE001 - the owner's failure: counted, answered
                self.counters["hint_errors"] += 1
                self.log.error("%s: discarding hinted pages failed: %s", self.name, e)
        self.counters["hints"] += 1
        self.counters["hinted_pages"] += discarded
        if len(good) == len(msg.ranges):
            self.accepted()
        body = p.DmFreePageHintResponse(
            discarded_pages=discarded, refused_ranges=len(msg.ranges) - len(good)
        )
        self.post(p.encode(T.FREE_PAGE_HINT_RESPONSE, body, trans_id=msg.trans_id))

    def _host_used(self, msg: p.Message) -> RangeSet:
        """The guest pages the host itself uses now (the VMBus rings), for checking the ranges
        of `msg`: a guest that names them (to hot-remove, or as free) is refused (HOST_USED)."""
        return RangeSet(self._host_pages()) if msg.ranges else RangeSet()

    def _bad_hint_range(self, r: PageRange, named: RangeSet, busy: RangeSet) -> str:
        if r.count == 0:
            return "no pages"
        if r.start % HINT_BLOCK_PAGES or r.count % HINT_BLOCK_PAGES:
            return "not whole 2 MiB blocks"
        if not self.ram.contains(*r):
            return "not RAM of this partition"
        if self.ballooned.overlaps(*r):
            return "ballooned: the host holds those pages already"
        if named.overlaps(*r):
            return "named twice"
        if busy.overlaps(*r):  # discarded, the host's ring would read zeros
            return HOST_USED
        return ""

    def _balloon_response(self, msg: p.Message) -> None:
        if self.state is not DmState.BALLOON_WAIT:
            return self._wrong_state(msg)
        good: list[PageRange] = []
        for r in msg.ranges:
            why = self._bad_balloon_range(r)
            if why:
                self.counters["bad_ranges"] += 1
                self.refuse(f"balloon range {r.start:#x}+{r.count}: {why}")
                continue
            self.ballooned.add(*r)
            self._balloon_got += r.count
            good.append(r)
        if self.stopped:
            return
        if good:
            self._on_ballooned(good)
        if len(good) == len(msg.ranges):
            self.accepted()
        if not msg.body.more_pages:
            if not msg.ranges:
                self.counters["balloon_at_minimum"] += 1
            got = self._balloon_got
            if got < self._balloon_asked and (not msg.ranges or got == 0):
                self._goal_blocked = (
                    f"the guest gave {got} of {self._balloon_asked} pages: it is at its floor "
                    "(it keeps enough memory to run)"
                )
            self._done(f"ballooned {got} of {self._balloon_asked} pages")
            self._on_balloon_done(got)
            self._advance()

    def _bad_balloon_range(self, r: PageRange) -> str:
        if r.count == 0:
            return "no pages"
        if not self.ram.contains(*r):
            return "not RAM of this partition"
        if self.ballooned.overlaps(*r):
            return "already ballooned"
        if self._balloon_got + r.count > self._balloon_asked:
            return f"more than the {self._balloon_asked} pages asked"
        return ""

    def _unballoon_response(self, msg: p.Message) -> None:
        if self.state is DmState.IDLE and self.unanswered.pages:
            # the answer to an unballoon that timed out: the guest has those pages now
            self.counters["late_unballoon_responses"] += 1
            self.unanswered = RangeSet()
            self.accepted()
            return
        if self.state is not DmState.UNBALLOON_WAIT:
            return self._wrong_state(msg)
        done = self._unballooning
        for r in done:
            try:
                self.ballooned.remove(*r)
            except RangeError as e:  # unballoon() checked them: a bug here, not the guest's
                raise VspError(str(e)) from e
        self._unballooning = []
        self.accepted()
        self._done(f"unballooned {sum(r.count for r in done)} pages")
        self._on_unballoon_done(done)
        self._advance()

    def _hot_add_response(self, msg: p.Message) -> None:
        if self.state is not DmState.HOT_ADD_WAIT:
            return self._wrong_state(msg)
        asked = self._hot_add
        assert asked is not None
        added, result = msg.body.page_count, msg.body.result
        if result not in (0, 1) or added > asked.count:
            self.refuse(
                f"hot-add response page_count={added} result={result} for {asked.count} asked"
            )
            return
        if added:
            self.ram.add(asked.start, added)
        # Reference 2.3: fewer pages than asked, or none with success, means stop hot-adding.
        if added < asked.count and (added or result == 1):
            self.hot_add_disabled = True
            self.counters["hot_add_disabled"] += 1
        self._hot_add = None
        self.accepted()
        if added < asked.count:
            self._goal_blocked = "the guest added fewer pages than offered: hot-add is off now"
        self._done(f"hot-added {added} of {asked.count} pages (result {result})")
        self._on_hot_add_done(asked, added, bool(result))
        self._advance()
