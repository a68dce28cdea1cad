"""The worker's Dynamic Memory service: VMBus and the Dynamic Memory VSP wired to a partition.

It owns, for one VM with Dynamic Memory:

- the VMBus controller on ports 0x0E00-0x0E33 (VP I/O intercepts), with the guest's doorbell
  on an ioeventfd (no user exit) served by a thread of its own, and host -> guest interrupts
  sent as MSIs to VP 0 (KVM_SIGNAL_MSI: no exit either);
- the offer of the DM channel and the :class:`DynamicMemoryVsp` behind it;
- the partition's entry in a :class:`MemoryManager` (startup RAM; ballooned pages released by
  punching holes in the RAM memfd; unballoon reclaims first; hot-add maps a new memory region
  above RAM while the VPs run, then sends DM_MEM_HOT_ADD_REQUEST);
- one *goal*: the pages the VM should be assigned. The operator's target and the balancer's
  add/remove all move the goal; the VSP's state machine walks towards it one DM transaction at a
  time (balloon to go down; unballoon first, then hot-add, to go up), as the book says, asking
  this service to reclaim pages before an unballoon and to map a region before a hot-add. The
  doorbell thread also ticks the VSP, so a transaction the guest leaves unanswered times out;
- the balloon's books: the VSP's ballooned ranges (less an unballoon in flight, reclaimed
  before it was sent) and the memory manager's are the same pages after every timeout, reset
  and reopen. :meth:`reconcile` checks it then; a difference is a host bug, logged, counted
  (`balloon_disagreements`) and settled the safe way: the host backs every page either side
  counts as the guest's.

`save()` / `restore()` carry the channel, the VSP and the counters across a live migration,
`save_memory()` / `restore_memory()` the memory layout (hot-added regions, the balloon).

Guest-visible memory = startup + hot-added; assigned = visible - ballooned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyhv import wire
from pyhv.dynmem import protocol as dmp
from pyhv.dynmem.status import MemoryStatus, VpCounters, VspCounters
from pyhv.dynmem.vsp import (
    DEFAULT_OP_TIMEOUT,
    MAX_BALLOON_PAGES,
    DmState,
    DmVspState,
    DynamicMemoryVsp,
    check_state_version,
)
from pyhv.hypervisor.intercepts import InterceptKind
from pyhv.memory.manager import PAGE_SIZE, MemoryManager, MemoryManagerError, MemoryState
from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.vmbus.channel import ChannelState
from pyhv.vmbus.controller import (
    DEFAULT_PORT,
    REGISTER_SPAN,
    ControllerState,
    Reg,
    VmbusController,
)
from pyhv.vmbus.ring import RingCorrupt
from pyhv.vmbus.vsp import VspError

if TYPE_CHECKING:
    from pyhv.hypervisor import Partition
    from pyhv.worker.config import VmConfig

log = logging.getLogger("pyhv.worker.dynmem")

MIB_PAGES = (1 << 20) // PAGE_SIZE
#: The 3-4 GiB hole (IOAPIC, LAPIC): no hot-added region may overlap it.
HOLE_START, HOLE_END = 3 << 30, 4 << 30
#: Statuses go to the owner at most this often: one that comes sooner waits out the interval
#: (the newest wins), so a guest that floods is kept to 20 a second, and the report of a burst
#: that follows the periodic one closely still goes out within 50 ms.
MIN_PUBLISH_INTERVAL = 0.05
#: Seconds between two looks at the VSP's transaction deadline (doorbell thread).
TICK = 0.25
DM_STATE_VERSION = 1


@dataclass(frozen=True)
class DynamicMemoryState:
    """The DM channel, VSP and service counters across a live migration (with the VP state)."""

    version: int
    channel: ControllerState
    vsp: DmVspState
    counters: Mapping[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> DynamicMemoryState:
        """The shape (types, declared by the fields); the parts' restore() check the values."""
        st = wire.from_wire(cls, d, "Dynamic Memory state")
        check_state_version(st.vsp.version)  # the VSP's part, checked as it is read
        if any(v < 0 for v in st.counters.values()):
            raise ValueError(f"Dynamic Memory counters {dict(st.counters)!r} are not counts")
        return st


class DynamicMemoryError(RuntimeError):
    """A Dynamic Memory request that cannot be carried out now; the message says why."""


def _vp_counters(vp: Any) -> VpCounters:
    """One VP's intercept counters (its per-kind arrays, which the C run loop adds to)."""
    kinds = {k.name.lower(): vp.counts[int(k)] for k in InterceptKind}
    return VpCounters(
        vp=vp.index,
        defaulted=sum(vp.defaults),
        errors=sum(vp.errors),
        handler_seconds=sum(vp.handler_ns) / 1e9,
        **kinds,
    )


def _version_text(v: int | None) -> str | None:
    return None if v is None else f"{v >> 16}.{v & 0xFFFF}"


class DynamicMemoryService:
    """Dynamic Memory for one partition (see the module docstring).

    `on_status(status)` gets :meth:`memory_status` (a MemoryStatus) after every status report
    the guest sends (on the doorbell thread: keep it quick), and when a goal is reached or given
    up (on the operations thread), so its owner sees what changed without asking. `interrupt_for(vector)` replaces the MSI to VP 0 (tests
    without VPs); `memory_manager` shares a host-wide manager (default: one of the VM's own
    whose budget is the configured maximum, so the free pool is the VM's headroom).
    """

    def __init__(
        self,
        partition: Partition,
        config: VmConfig,
        *,
        on_status: Callable[[MemoryStatus], object] | None = None,
        memory_manager: MemoryManager | None = None,
        interrupt_for: Callable[[int], Callable[[], object]] | None = None,
        op_timeout: float = DEFAULT_OP_TIMEOUT,
        base_port: int = DEFAULT_PORT,
        smart_paging: Any = None,
    ) -> None:
        self.partition = partition
        self.config = config
        self.name = config.name
        self.startup_pages = config.memory // PAGE_SIZE
        self.minimum_pages = config.minimum // PAGE_SIZE
        self.maximum_pages = config.maximum // PAGE_SIZE
        self._on_status = on_status
        self._own_mm = memory_manager is None  # its budget is the maximum: grows with it
        self.mm = memory_manager or MemoryManager(max(config.maximum, config.memory))
        ram = partition.ram
        # `smart_paging`: the region backed by the Smart Paging file (pyhv.worker.smartpaging)
        self.mm.add_partition(
            self.name, ram, self._map_region, self._unmap_region, smart_paging=smart_paging
        )
        self.vsp = DynamicMemoryVsp(
            RangeSet((r.gpa // PAGE_SIZE, r.size // PAGE_SIZE) for r in ram),
            assigned_pages=lambda: self._mm_part.assigned_pages,
            on_status=self._status_report,
            on_ballooned=self._ballooned,
            on_balloon_done=self._transaction_done,
            on_unballoon_done=self._transaction_done,
            on_hot_add_done=self._hot_added,
            on_reset=self._reset,
            on_hinted=self._hinted,
            on_hot_removed=self._hot_removed,
            on_hot_remove_done=self._hot_remove_done,
            host_pages=self._ring_pages,
            reclaim=self._reclaim,
            map_hot_add=self._map_hot_add,
            on_goal_done=self._goal_done,
            op_timeout=op_timeout,
            name=f"dynmem-{self.name}",
        )
        self.controller = VmbusController(
            partition.view, interrupt_for or self._msi_to_vp0, base_port=base_port
        )
        self.offer = self.controller.offer(dmp.DM_GUID, self.vsp.bind)
        self.counters: dict[str, int] = {
            "status_reports": 0,
            "release_errors": 0,
            "reclaim_errors": 0,
            "timeouts": 0,
            "refused_requests": 0,
            "ballooned_pages": 0,
            "unballooned_pages": 0,
            "hot_added_pages": 0,
            "doorbell_exits": 0,
            "doorbell_errors": 0,
            "status_not_published": 0,
            "late_packets": 0,
            "hinted_pages": 0,
            "hint_discard_us": 0,
            "balloon_checks": 0,
            "balloon_disagreements": 0,
            "hot_removed_pages": 0,
            "hot_remove_errors": 0,
            "hot_add_declined_pages": 0,
        }
        #: The guest's last status report, as the VSP decoded it.
        self.last_status: MemoryStatus | None = None
        self._publish_lock = threading.Lock()
        #: The newest status not yet sent; the status thread sends it outside the VSP's lock.
        self._outgoing: MemoryStatus | None = None
        self._host_news = False  # the outgoing status says a goal ended: no spacing
        # Its own condition, not _cv: _publish runs with the VSP's lock held, and
        # set_memory_limits takes the VSP's lock inside _cv.
        self._out_cv = threading.Condition()
        self._publisher: threading.Thread | None = None
        self._info_for: object = None
        self._cv = threading.Condition()
        self._closing = False
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._threads: list[threading.Thread] = []
        self._doorbell_fd: int | None = None
        #: For the benchmark: host time from a doorbell seen to its replies posted (ns).
        self.doorbell_ns: list[int] = []
        self.measure = False

    @property
    def _mm_part(self) -> Any:
        return self.mm.partitions[self.name]

    @property
    def op_timeout(self) -> float:
        """Seconds the guest has to answer one DM transaction."""
        return self.vsp.op_timeout

    @op_timeout.setter
    def op_timeout(self, seconds: float) -> None:
        self.vsp.op_timeout = seconds

    @property
    def operation(self) -> str | None:
        """The DM transaction in flight, in words."""
        return self.vsp.operation

    @property
    def last_error(self) -> str | None:
        """Why the last goal was given up (None: reached)."""
        return self.vsp.goal_error

    # --- wiring ---------------------------------------------------------------------------

    def start(self) -> None:
        """Install the controller's ports and the doorbell, and start the service threads.
        Call before the VPs start."""
        base = self.controller.base_port
        self.partition.intercepts.install_io(base, base + REGISTER_SPAN - 1, self._io)
        ev = self.partition.ioeventfd(
            base + Reg.DOORBELL, 4, datamatch=self.offer.relid
        )  # writes of other values still exit and are refused by the controller
        self._doorbell_fd = ev.fd
        t = threading.Thread(target=self._doorbell_loop, name=f"doorbell-{self.name}", daemon=True)
        t.start()
        self._threads.append(t)
        if self._on_status is not None:
            p = threading.Thread(
                target=self._send_statuses, name=f"status-{self.name}", daemon=True
            )
            p.start()
            self._threads.append(p)
            self._publisher = p

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        with self._out_cv:
            self._out_cv.notify_all()
        os.eventfd_write(self._stop_fd, 1)
        for t in self._threads:
            t.join(5)
        self.controller.reset()
        os.close(self._stop_fd)
        try:
            self.mm.remove_partition(self.name)
        except MemoryManagerError:
            pass

    def _msi_to_vp0(self, vector: int) -> Callable[[], object]:
        return lambda: self.partition.interrupt(0, vector)

    def _io(self, msg: Any) -> int | bytes | None:
        """A VP's access to the controller's ports (never the matched doorbell: no exit)."""
        offset = msg.port - self.controller.base_port
        mask = (1 << (8 * msg.access_size)) - 1
        if msg.is_write:
            if offset == Reg.DOORBELL:
                self.counters["doorbell_exits"] += 1
            self.controller.io_write(offset, msg.value)
            self._after_guest()
            return None
        if msg.count > 1:  # REP INS: one register read per element
            return b"".join(
                (self.controller.io_read(offset) & mask).to_bytes(msg.access_size, "little")
                for _ in range(msg.count)
            )
        return self.controller.io_read(offset) & mask

    def _doorbell_loop(self) -> None:
        assert self._doorbell_fd is not None
        sel = selectors.DefaultSelector()
        sel.register(self._doorbell_fd, selectors.EVENT_READ, "doorbell")
        sel.register(self._stop_fd, selectors.EVENT_READ, "stop")
        clock = time.monotonic
        next_tick = clock()
        try:
            while True:
                # the VSP's deadline is looked at every TICK, not on every doorbell
                now = clock()
                if now >= next_tick:
                    self._tick()
                    next_tick = now + TICK
                for key, _ in sel.select(next_tick - now):
                    if key.data == "stop":
                        return
                    try:
                        os.eventfd_read(self._doorbell_fd)
                    except BlockingIOError:
                        continue
                    t0 = time.perf_counter_ns() if self.measure else 0
                    try:
                        self.controller.doorbell(self.offer.relid)
                        self._drain_late_packets()
                        self._after_guest()
                    except Exception:  # noqa: BLE001 - a host bug must not end the service
                        log.exception("%s: serving a doorbell failed", self.name)
                        self.counters["doorbell_errors"] += 1
                    if self.measure:
                        self.doorbell_ns.append(time.perf_counter_ns() - t0)
        finally:
            sel.close()

    def _tick(self) -> None:
        """A transaction the guest leaves unanswered past its deadline times out."""
        before = self.vsp.counters["timeouts"]
        self.vsp.tick()
        timeouts = self.vsp.counters["timeouts"] - before
        self.counters["timeouts"] += timeouts
        if timeouts:
            self.reconcile("after a timeout")

    def _drain_late_packets(self, rounds: int = 64) -> None:
        """Serve packets the guest wrote while we drained: it wrote them before we published
        read_index, so the ring did not look empty to it and it did not ring (the Hyper-V
        signalling rule); without a second look they would wait for the next doorbell."""
        for _ in range(rounds):
            ch = self.offer.channel
            if ch is None or ch.state is not ChannelState.OPEN:
                return
            try:
                if not ch.reader.available():
                    return
            except RingCorrupt:
                pass  # the next poll closes the channel with the reason
            self.counters["late_packets"] += 1
            ch.doorbell()

    def _after_guest(self) -> None:
        """After guest messages: once per negotiation, tell the guest the maximum page count."""
        vsp = self.vsp
        with vsp.lock:
            caps = vsp.caps
            if caps is None or caps is self._info_for or vsp.stopped:
                return
            self._info_for = caps
            if vsp.version is not None and vsp.version >= dmp.Version.WIN8:
                vsp.send_info_max_page_count(self.maximum_pages)
            self.reconcile("after the guest negotiated (its channel opened)")
        with self._cv:
            self._cv.notify_all()  # a goal set before negotiation can start now

    # --- VSP callbacks (doorbell thread, VSP lock held) ------------------------------------

    def _status_report(self, report: MemoryStatus) -> None:
        self.last_status = report
        self.counters["status_reports"] += 1
        self._publish()

    def _publish(self, host_news: bool = False) -> None:
        """Push the VM's memory status to the owner (the VMMS): no one has to ask for it. Taken
        here (often with the VSP's lock held), sent by the status thread: a slow owner never
        holds up the doorbell or a VP. Only the newest unsent status is kept. `host_news` (a
        goal reached or given up: one per transaction, paced by the host, not the guest) goes
        out without waiting out MIN_PUBLISH_INTERVAL."""
        if self._on_status is None:
            return
        status = self.memory_status()
        if self._publisher is None:  # not started (library use without threads): send now
            self._send(status)
            return
        with self._out_cv:
            if self._outgoing is not None:  # replaced before it went out
                self.counters["status_not_published"] += 1
            self._outgoing = status
            self._host_news = self._host_news or host_news
            self._out_cv.notify_all()

    def _send_statuses(self) -> None:
        sent_at = -MIN_PUBLISH_INTERVAL
        while True:
            with self._out_cv:
                self._out_cv.wait_for(lambda: self._closing or self._outgoing is not None)
                # at most one per MIN_PUBLISH_INTERVAL: a newer status may replace it meanwhile
                spacing = sent_at + MIN_PUBLISH_INTERVAL - time.monotonic()
                if spacing > 0 and not self._host_news:
                    self._out_cv.wait_for(lambda: self._closing or self._host_news, spacing)
                status, self._outgoing, self._host_news = self._outgoing, None, False
            if status is not None:
                sent_at = time.monotonic()
                self._send(status)
            elif self._closing:
                return

    def _send(self, status: MemoryStatus) -> None:
        # One at a time, so the owner receives them in the order they were taken and the last
        # one it keeps is the newest.
        assert self._on_status is not None
        with self._publish_lock:
            try:
                self._on_status(status)
            except Exception:  # noqa: BLE001 - the listener's problem, not the guest's
                log.exception("%s: status listener failed", self.name)

    def _ballooned(self, ranges: list[PageRange]) -> None:
        try:
            n = self.mm.release(self.name, ranges)
        except (MemoryManagerError, OSError) as e:
            self.counters["release_errors"] += 1
            log.error("%s: releasing ballooned pages failed: %s", self.name, e)
            return
        self.counters["ballooned_pages"] += n

    def _hinted(self, ranges: list[PageRange]) -> int:
        """Free-page hints (the VSP checked them): the memory behind them leaves the host."""
        t0 = time.perf_counter()
        n = self.mm.discard(self.name, ranges)
        self.counters["hinted_pages"] += n
        self.counters["hint_discard_us"] += int((time.perf_counter() - t0) * 1e6)
        return n

    def _reset(self, held: list[PageRange]) -> None:
        """The guest started over: the pages it had ballooned are its own again."""
        if held:
            try:
                self.mm.reclaim(self.name, held)
            except MemoryManagerError as e:
                self.counters["reclaim_errors"] += 1
                log.error("%s: reclaiming a reset guest's balloon failed: %s", self.name, e)
        self.reconcile("after a reset")
        self._transaction_done()

    def reconcile(self, when: str) -> bool:
        """Whether the VSP's balloon and the memory manager's are the same pages (see the module
        docstring); if not, log and count it and settle it: pages only the memory manager holds
        are reclaimed, pages only the VSP lists are dropped from it (the host backs them)."""
        vsp = self.vsp
        with vsp.lock:
            self.counters["balloon_checks"] += 1
            books = RangeSet(vsp.ballooned)
            for r in vsp.unballooning:  # in flight: reclaimed before the request was sent
                books.remove(*r)
            held = self._mm_part.ballooned
            only_mm, only_vsp = held.difference(books), books.difference(held)
            if not only_mm and not only_vsp:
                return True
            self.counters["balloon_disagreements"] += 1
            log.error(
                "%s: %s the balloon's books disagree: %d pages only the memory manager holds "
                "(%s), %d only the VSP lists (%s); the guest gets them all back",
                self.name,
                when,
                sum(r.count for r in only_mm),
                only_mm[:4],
                sum(r.count for r in only_vsp),
                only_vsp[:4],
            )
            for r in only_vsp:
                vsp.ballooned.remove(*r)
            if only_mm:
                try:
                    self.mm.reclaim(self.name, only_mm)
                except MemoryManagerError as e:  # the pool is short: say so, keep them held
                    self.counters["reclaim_errors"] += 1
                    log.error("%s: reclaiming %s failed: %s", self.name, only_mm[:4], e)
            return False

    def _transaction_done(self, *_: object) -> None:
        with self._cv:
            self._cv.notify_all()

    def _goal_done(self, why: str | None) -> None:
        """The goal was reached or given up: the owner sees it without waiting for a report."""
        self._transaction_done()
        self._publish(host_news=True)

    def _reclaim(self, ranges: list[PageRange]) -> None:
        """Before an unballoon: the host backs the pages again (taken from the pool)."""
        self.counters["unballooned_pages"] += self.mm.reclaim(self.name, ranges)

    def _hot_added(self, asked: PageRange, added: int, ok: bool) -> None:
        self.counters["hot_added_pages"] += added
        if added < asked.count:  # count what the guest took, not what was offered
            self._decline_hot_add(PageRange(asked.start + added, asked.count - added))
        self._transaction_done()

    def _decline_hot_add(self, declined: PageRange) -> None:
        try:
            n = self.mm.decline_hot_add(self.name, declined)
        except (MemoryManagerError, OSError) as e:
            self.counters["hot_remove_errors"] += 1
            log.error("%s: giving back a declined hot-add failed: %s", self.name, e)
            return
        self.counters["hot_add_declined_pages"] += n
        log.info("%s: the guest declined %d hot-added pages at %#x", self.name, n, declined.start)

    def _hot_removed(self, ranges: list[PageRange]) -> None:
        """Ranges the guest gave back offline (the VSP checked them): the host memory goes."""
        try:
            n = self.mm.hot_remove(self.name, ranges)
        except (MemoryManagerError, OSError) as e:
            self.counters["hot_remove_errors"] += 1
            log.error("%s: taking back hot-removed pages failed: %s", self.name, e)
            return
        self.counters["hot_removed_pages"] += n

    def _ring_pages(self) -> list[PageRange]:
        """The guest pages the host reads and writes: the open channels' ring areas."""
        out = []
        for offer in self.controller.offers:
            ch = offer.channel
            if ch is not None and ch.ring_gpa is not None:
                out.append(PageRange(ch.ring_gpa // PAGE_SIZE, ch.ring_pages))
        return out

    def _hot_remove_done(self, pages: int) -> None:
        self._transaction_done()
        self._publish(host_news=True)  # Guest Visible Physical Memory fell: say so now

    def hot_remove(self, pages: int | None = None) -> dict[str, Any]:
        """Ask the guest to give `pages` back offline (DM hot-remove; default: every hot-added
        page it holds), never below the VM's minimum. Returns at once with the plan;
        :meth:`wait_idle` waits for the guest's answer."""
        if pages is not None:
            self._check_pages(pages)
        self._require_running("hot-remove")
        vsp = self.vsp
        with vsp.lock:
            if not vsp.hot_remove_offered:
                self.counters["refused_requests"] += 1
                raise DynamicMemoryError(
                    f"hot-remove: the guest of VM {self.name!r} did not report the hot-remove "
                    "capability (Dynamic Memory protocol 2.0); balloon it instead"
                )
            if vsp.state is not DmState.IDLE or vsp.goal is not None:
                self.counters["refused_requests"] += 1
                raise DynamicMemoryError(
                    f"hot-remove: VM {self.name!r} is busy ({vsp.operation or 'a goal'}): wait"
                )
            part = self._mm_part
            room = part.assigned_pages - self.minimum_pages
            held = part.hot_added_held_pages
            asked = held if pages is None else pages
            n = min(asked, room, MAX_BALLOON_PAGES)  # what the VSP asks at a time
            if n <= 0:
                self.counters["refused_requests"] += 1
                raise DynamicMemoryError(
                    f"hot-remove of {asked} pages: VM {self.name!r} has {room} pages above its "
                    "minimum and nothing asked to remove; lower the minimum or ask for pages"
                )
            try:
                vsp.hot_remove(n)
            except VspError as e:  # the channel went away meanwhile
                self.counters["refused_requests"] += 1
                raise DynamicMemoryError(f"hot-remove: {e}") from None
        log.info("%s: hot-remove of %d pages asked", self.name, n)
        return {"asked_pages": asked, "requested_pages": n, "visible_pages": part.visible_pages}

    def _map_hot_add(self, pages: int, align: int) -> PageRange:
        """Before a hot-add: a new region above RAM (and above the 3-4 GiB hole)."""
        top = max(r.gpa + r.size for r in self._mm_part.regions)
        start = -(-top // (align * PAGE_SIZE)) * align * PAGE_SIZE
        if start < HOLE_END and start + pages * PAGE_SIZE > HOLE_START:
            align = HOLE_END // PAGE_SIZE  # continue above the 3-4 GiB hole
        region = self.mm.hot_add(self.name, pages, align_pages=align)
        return PageRange(region.gpa // PAGE_SIZE, pages)

    # --- state ----------------------------------------------------------------------------

    def memory_status(self) -> MemoryStatus:
        """The VM's memory as the memory manager accounts it, the guest's last report, and the
        VSP's and VPs' counters: what is pushed to the VMMS."""
        part = self._mm_part
        report = self.last_status
        vsp, ctl = self.vsp.counters, self.controller.counters
        c = self.counters
        busy = self.vsp.goal is not None or self.vsp.state.waiting
        return MemoryStatus(
            visible_pages=part.visible_pages,
            assigned_pages=part.assigned_pages,
            ballooned_pages=part.ballooned.pages,
            smart_paging_pages=part.smart_paging_pages,
            committed_pages=None if report is None else report.committed_pages,
            available_pages=None if report is None else report.available_pages,
            guest_committed_pages=None if report is None else report.guest_committed_pages,
            busy=busy,
            reported_at=0.0 if report is None else report.reported_at,
            page_file_pages=0 if report is None else report.page_file_pages,
            page_file_writes=0 if report is None else report.page_file_writes,
            vsp=VspCounters(
                status_reports=c["status_reports"],
                messages_accepted=vsp["accepted"],
                messages_refused=vsp["refused"],
                bad_ranges=vsp["bad_ranges"],
                transitions=vsp["transitions"],
                resets=vsp["resets"],
                timeouts=c["timeouts"],
                ballooned_pages=c["ballooned_pages"],
                unballooned_pages=c["unballooned_pages"],
                hot_added_pages=c["hot_added_pages"],
                hot_removed_pages=c["hot_removed_pages"],
                hot_remove_refused=vsp["hot_remove_bad_ranges"] + vsp["hot_remove_unasked"],
                doorbells=ctl["doorbells"],
                controller_refused=ctl["refused"],
            ),
            vps=tuple(_vp_counters(vp) for _, vp in sorted(self.partition.vps.items())),
        )

    def status(self) -> dict[str, Any]:
        """The operator's view (`pyhv memory --control`), JSON-ready (pages of 4 KiB): the
        memory status plus the protocol's state, the goal and the last error."""
        st = self.memory_status()
        vsp = self.vsp
        out: dict[str, Any] = {
            "state": vsp.state.name,
            "negotiated": self.negotiated,
            "protocol": _version_text(vsp.version),
            "caps": None
            if vsp.caps is None
            else {
                "balloon": vsp.caps.balloon,
                "hot_add": vsp.caps.hot_add,
                "hot_add_alignment_mib": vsp.caps.hot_add_alignment_mib,
            },
            "hot_add_disabled": vsp.hot_add_disabled,
            "startup_pages": self.startup_pages,
            "minimum_pages": self.minimum_pages,
            "maximum_pages": self.maximum_pages,
            "visible_pages": st.visible_pages,
            "assigned_pages": st.assigned_pages,
            "ballooned_pages": st.ballooned_pages,
            "hot_added_pages": self._mm_part.hot_added_pages,
            "removed_pages": self._mm_part.removed.pages,
            "hot_remove": vsp.hot_remove_offered,
            "smart_paging_pages": st.smart_paging_pages,
            "goal_pages": vsp.goal,
            "operation": self.operation,
            "last_error": self.last_error,
            "free_pool_pages": self.mm.free_pages,
            "last_status": None,
            "bad_messages": st.vsp.messages_refused,
            "bad_ranges": st.vsp.bad_ranges,
            "controller_refused": st.vsp.controller_refused,
            "counters": dict(self.counters),
        }
        if st.reported:
            out["last_status"] = {
                "committed_pages": st.committed_pages,
                "available_pages": st.available_pages,
                "pressure": st.pressure,
                "time": st.reported_at,
                "page_file_pages": st.page_file_pages,
                "page_file_writes": st.page_file_writes,
            }
            out["committed_pages"] = st.committed_pages
            out["available_pages"] = st.available_pages
        return out

    @property
    def negotiated(self) -> bool:
        return self.vsp.caps is not None and self.vsp.state not in (
            DmState.VERSION,
            DmState.CAPS,
            DmState.STOPPED,
        )

    # --- requests -------------------------------------------------------------------------

    def _require_running(self, what: str) -> None:
        if not self.negotiated:
            self.counters["refused_requests"] += 1
            why = self.vsp.stop_reason or "its guest has not negotiated the protocol yet"
            raise DynamicMemoryError(
                f"{what}: Dynamic Memory is not running in VM {self.name!r} (VSP state "
                f"{self.vsp.state.name}: {why}); wait for the guest's DM driver"
            )

    def _set_goal(self, pages: int, what: str) -> dict[str, Any]:
        self._require_running(what)
        lo, hi = self.minimum_pages, self.maximum_pages
        goal = min(max(pages, lo), hi)
        self.vsp.set_goal(goal)
        with self._cv:
            self._cv.notify_all()
        assigned = self._mm_part.assigned_pages
        log.info("%s: %s: goal %d pages (assigned %d)", self.name, what, goal, assigned)
        return {
            "asked_pages": pages,
            "goal_pages": goal,
            "clamped": goal != pages,
            "assigned_pages": assigned,
            "minimum_pages": lo,
            "maximum_pages": hi,
        }

    def set_target(self, target_bytes: int) -> dict[str, Any]:
        """Move the VM's assigned memory towards `target_bytes` (clamped to [minimum, maximum]);
        returns at once with the plan; :meth:`wait_idle` waits for the guest."""
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 0:
            raise DynamicMemoryError(f"memory target {target_bytes!r} must be a number of bytes")
        return self._set_goal(target_bytes // PAGE_SIZE, f"target {target_bytes} bytes")

    def set_limits(self, minimum_bytes: int, maximum_bytes: int) -> dict[str, Any]:
        """Change the range goals are clamped to while the VM runs, as the book allows: the
        minimum may only go down, the maximum only up (never below what is assigned). A raised
        maximum grows the VM's own pool and is told to the guest (the info message)."""
        for what, v in (("minimum", minimum_bytes), ("maximum", maximum_bytes)):
            if (
                isinstance(v, bool)
                or not isinstance(v, int)
                or v <= 0
                or v % (MIB_PAGES * PAGE_SIZE)
            ):
                raise DynamicMemoryError(f"{what} memory {v!r} must be a whole number of MiB")
        lo, hi = minimum_bytes // PAGE_SIZE, maximum_bytes // PAGE_SIZE
        with self._cv:
            old_lo, old_hi = self.minimum_pages, self.maximum_pages
            assigned = self._mm_part.assigned_pages
            if lo > old_lo:
                raise DynamicMemoryError(
                    f"minimum can only go down while VM {self.name!r} runs (from "
                    f"{old_lo // MIB_PAGES} MiB, asked {lo // MIB_PAGES} MiB)"
                )
            if hi < old_hi or hi < assigned:
                raise DynamicMemoryError(
                    f"maximum can only go up while VM {self.name!r} runs (from "
                    f"{old_hi // MIB_PAGES} MiB, {assigned // MIB_PAGES} MiB assigned; asked "
                    f"{hi // MIB_PAGES} MiB)"
                )
            if self._own_mm and hi > old_hi:
                self.mm.grow_budget(hi - old_hi)
            self.minimum_pages, self.maximum_pages = lo, hi
            self._cv.notify_all()
        informed = False
        vsp = self.vsp
        if hi != old_hi:
            with vsp.lock:
                if (
                    vsp.caps is not None
                    and not vsp.stopped
                    and vsp.version is not None
                    and vsp.version >= dmp.Version.WIN8
                ):
                    vsp.send_info_max_page_count(hi)
                    informed = True
        log.info("%s: limits %d..%d pages (were %d..%d)", self.name, lo, hi, old_lo, old_hi)
        return {
            "minimum_pages": lo,
            "maximum_pages": hi,
            "assigned_pages": assigned,
            "guest_informed": informed,
        }

    def end_smart_paging(self) -> dict[str, Any]:
        """Smart Paging ends: the pages still in the file move into host memory (taken from the
        VM's pool). Copied first while the VPs run (the range's slot logs the guest's writes),
        then, with the VPs paused and the VSP and its channel held, the pages written since
        are copied again and the memory swapped in; the new status is pushed. If the DM
        channel's rings lie in the range (the host writes them, unlogged), all of it is copied
        with the VPs paused."""
        from pyhv.memory.smartpaging import copy_data, move_to_memory, new_memory, release_file

        region = self._mm_part.smart_paging
        if region is None:
            raise DynamicMemoryError(f"VM {self.name!r} does not use Smart Paging")
        ch = self.offer.channel
        ring_gpa = None if ch is None else ch.ring_gpa
        in_range = (
            ch is not None
            and ring_gpa is not None
            and ring_gpa < region.end
            and region.gpa < ring_gpa + ch.ring_pages * PAGE_SIZE
        )
        precopy = region.track_dirty and not in_range
        copied: list[int] = []
        file = (region.memfd, region.offset, region.size)
        memfd: int | None = None
        pre = paused_us = 0
        try:
            if precopy:
                region.dirty_bitmap()  # from here on, what the guest writes is logged
                with self.vsp.lock:
                    balloon = RangeSet(self._mm_part.ballooned)
                memfd = new_memory(region, self.name)
                pre = copy_data(region, memfd, balloon)
            t0 = time.perf_counter_ns()
            self.partition.pause()
            try:
                # No balloon and no ring write into the range while it moves: the VSP's lock,
                # then the channel's (the order live migration takes them in).
                with self.vsp.lock, ch.frozen() if ch is not None else contextlib.nullcontext():
                    dirty = region.dirty_pages() if precopy else None
                    pages = self.mm.end_smart_paging(
                        self.name,
                        lambda r, b: copied.append(
                            move_to_memory(r, b, self.name, memfd=memfd, dirty=dirty)
                        ),
                    )
            finally:
                self.partition.resume()
                paused_us = (time.perf_counter_ns() - t0) // 1000
        except (MemoryManagerError, OSError) as e:
            if memfd is not None and region.memfd != memfd:
                os.close(memfd)
            raise DynamicMemoryError(f"ending Smart Paging of VM {self.name!r}: {e}") from None
        release_file(*file)
        c = self.counters
        c["smart_paging_moved_bytes"] = c.get("smart_paging_moved_bytes", 0) + pre + copied[0]
        c["smart_paging_pause_us"] = paused_us
        log.info(
            "%s: Smart Paging ended: %d pages into memory, %d bytes copied while the VPs ran, "
            "%d bytes with them paused for %d us",
            self.name,
            pages,
            pre,
            copied[0],
            paused_us,
        )
        with self.vsp.lock:
            self._publish()
        return {
            "pages": pages,
            "copied_bytes": pre + copied[0],
            "copied_paused_bytes": copied[0],
            "paused_us": paused_us,
        }

    def add(self, pages: int) -> dict[str, Any]:
        """The balancer's "add N pages": unballoon first, then hot-add the rest."""
        self._check_pages(pages)
        return self._set_goal(self._base() + pages, f"add {pages} pages")

    def remove(self, pages: int) -> dict[str, Any]:
        """The balancer's "remove N pages": balloon them out of the guest."""
        self._check_pages(pages)
        return self._set_goal(self._base() - pages, f"remove {pages} pages")

    def _check_pages(self, pages: int) -> None:
        if isinstance(pages, bool) or not isinstance(pages, int) or pages < 0:
            raise DynamicMemoryError(f"page count {pages!r} must be an integer >= 0")

    def _base(self) -> int:
        goal = self.vsp.goal
        return goal if goal is not None else self._mm_part.assigned_pages

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no goal is pending (reached, or given up with `last_error`)."""
        vsp = self.vsp
        with self._cv:
            return self._cv.wait_for(lambda: vsp.goal is None and not vsp.state.waiting, timeout)

    # --- save / restore (live migration) --------------------------------------------------

    def save_memory(self) -> MemoryState:
        """The VM's memory layout as the memory manager accounts it (hot-added, ballooned)."""
        return self.mm.save(self.name)

    def restore_memory(self, state: MemoryState) -> None:
        """Before guest memory arrives: the hot-added regions mapped at their GPAs (accounted),
        the balloon released. Refused with nothing changed if it does not fit here."""
        added = self.mm.restore(self.name, state)
        for r in added:
            self.vsp.ram.add(r.gpa // PAGE_SIZE, r.size // PAGE_SIZE)
        for gone in state.removed:  # offline in the guest: not its RAM any more
            self.vsp.ram.remove(gone.start, gone.count)

    def save(self) -> DynamicMemoryState:
        """The channel, the VSP and the counters (VPs paused; no transaction in flight)."""
        with self.vsp.lock:
            return DynamicMemoryState(
                DM_STATE_VERSION, self.controller.save(), self.vsp.save(), dict(self.counters)
            )

    def check(self, state: DynamicMemoryState) -> None:
        """ValueError naming the value if `state` does not fit this VM (its memory layout
        restored first)."""
        if state.version != DM_STATE_VERSION:
            raise ValueError(
                f"Dynamic Memory state version {state.version!r} is not {DM_STATE_VERSION}"
            )
        balloon = [tuple(r) for r in self._mm_part.ballooned]
        if [tuple(r) for r in state.vsp.ballooned] != balloon:
            raise ValueError(
                f"the DM VSP's balloon {list(state.vsp.ballooned)} is not the memory manager's "
                f"{balloon}: restore the memory layout first"
            )
        self.controller.check(state.channel)
        self.vsp.check(state.vsp)

    def restore(self, state: DynamicMemoryState) -> None:
        """After memory and VP state, before the VPs run: the channel is open again over the
        same rings and the VSP goes on where it was (no new negotiation: the guest does not
        know it moved). Everything is checked before anything changes (ValueError)."""
        with self.vsp.lock:
            self.check(state)
            self.controller.restore(state.channel)
            self.vsp.restore(state.vsp)
            self._info_for = self.vsp.caps  # the guest has the maximum page count already
        self.counters.update(state.counters)

    def _unmap_region(self, region: Any) -> None:
        self.partition.remove_memory(region)

    def _map_region(self, gpa: int, size: int) -> Any:
        if gpa < HOLE_END and gpa + size > HOLE_START:
            raise MemoryManagerError(
                f"hot-add region {gpa:#x}+{size:#x} would overlap the 3-4 GiB APIC hole"
            )
        return self.partition.add_memory(gpa, size)
