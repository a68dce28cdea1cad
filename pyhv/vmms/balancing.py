"""The VMMS's balancer loop: every second, for the VMs with Dynamic Memory, read each VM's
latest memory status (pushed by its worker, kept by the pool: no request to any worker), build
the balancer's state, call `decide`, send each operation to its worker as a memory target, and
record the counters.

A removal the guest answers short (it is at its floor: it keeps enough memory to run) leaves the
VM's assigned memory as its *floor*: the balancer asks nothing below it again until the VM's
demand changes (as Hyper-V takes the guest's floor into account), instead of asking every tick.

A worker is reached through a small interface (:class:`DynamicMemoryWorker`): "move this VM's
memory to N pages" (the worker balloons, or unballoons first and hot-adds the rest, as the book
says). A target is idempotent, so a lost or repeated request does no harm; tests drive the loop
with fake workers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

from pyhv.counters.dynmem import DynamicMemoryCounters
from pyhv.dynmem.balancer import (
    PAGE_SIZE,
    Add,
    BalancerConfig,
    Decision,
    HostMemory,
    MemorySettings,
    Operation,
    Remove,
    VmMemoryState,
    applied,
    decide,
    host_after,
    mib_from_pages,
)
from pyhv.dynmem.status import MemoryStatus
from pyhv.vmms.pool import HostPool

log = logging.getLogger(__name__)

NOT_RUNNING = "Dynamic Memory is not running in this VM"


class DynamicMemoryUnavailable(RuntimeError):
    """The VM's worker has no Dynamic Memory channel (DM off, guest without the VSC, or a
    worker without the DM wiring)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(NOT_RUNNING + (f": {detail}" if detail else ""))


@runtime_checkable
class DynamicMemoryWorker(Protocol):
    """What the VMMS asks of a worker for Dynamic Memory (pyhv.worker.WorkerProcess). Its
    status is not asked for: the worker pushes it, and the pool keeps the latest."""

    def set_memory_target(self, target_bytes: int) -> object:
        """Move the VM's assigned memory towards `target_bytes` (balloon, or unballoon first
        and hot-add the rest); returns at once; RuntimeError when it cannot."""


def dm_port(worker: object) -> DynamicMemoryWorker | None:
    """The worker's DM interface if it has one (a worker without the DM wiring has not)."""
    return worker if isinstance(worker, DynamicMemoryWorker) else None


@dataclass
class _Tracked:
    above_target_s: float = 0.0
    pending: Operation | None = None
    target: int = 0
    dispatched_from: int = 0
    ticks: int = 0
    add_hold_s: float = 0.0
    committed_seen: int | None = None
    #: The pool's count of the VM's statuses when the worker took the target: only a later
    #: status can say whether the target was reached.
    received_at_dispatch: int = 0
    #: Assigned pages at which the guest last answered a removal short (0: none), and the
    #: demand it reported then: the floor holds until the demand moves.
    floor: int = 0
    floor_demand: int | None = None


class BalancerLoop:
    """One tick per second over the VMs given by `vms()` ({name: (settings, worker)})."""

    def __init__(
        self,
        pool: HostPool,
        vms: Callable[[], Mapping[str, tuple[MemorySettings, DynamicMemoryWorker]]],
        counters: DynamicMemoryCounters | None = None,
        config: BalancerConfig | None = None,
        pending_ticks: int = 10,
    ) -> None:
        self.pool = pool
        self.config = config or BalancerConfig()
        self.counters = counters
        self._vms = vms
        self._pending_ticks = pending_ticks
        self.looks = 0  #: looks at the reports between ticks, early tick or not
        self._looked = threading.Condition()
        self._tracked: dict[str, _Tracked] = {}
        self._lock = threading.Lock()
        self._arrived = threading.Event()
        self.last_decision: Decision | None = None
        #: Called after every tick with the decision and the states it was made from (the
        #: flight recorder: pyhv.vmms.tracing).
        self.decision_listeners: list[Callable[[Decision, list[VmMemoryState]], object]] = []

    def forget(self, name: str) -> None:
        with self._lock:
            self._tracked.pop(name, None)
        if self.counters is not None:
            self.counters.forget_vm(name)

    def request_target(self, name: str, worker: DynamicMemoryWorker, pages: int) -> None:
        """An administrator's target (`pyhv vm memory NAME --target`): carried out like a
        balancer operation, so the pool and counters follow; the balancer resumes after it."""
        try:
            current = self.pool.assigned_pages(name)
        except KeyError:
            raise DynamicMemoryUnavailable("the VM holds no memory of the pool") from None
        op: Operation = (
            Add(name, pages - current, 0, 0) if pages >= current else Remove(name, current - pages)
        )
        with self._lock:
            try:
                worker.set_memory_target(pages * PAGE_SIZE)
            except RuntimeError as e:
                raise DynamicMemoryUnavailable(str(e)) from None
            self._tracked[name] = _Tracked(
                self._tracked.get(name, _Tracked()).above_target_s,
                op,
                pages,
                current,
                received_at_dispatch=self.pool.received(name),
            )

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Hold the loop between ticks (an experiment starts two VMs' workloads so that one
        tick sees both: pyhv.experiments.contention)."""
        with self._lock:
            yield

    def tick(self) -> Decision | None:
        """One balancer pass; returns the decision (None with no reporting DM VM)."""
        with self._lock:
            return self._tick()

    def _tick(self, elapsed_s: float | None = None) -> Decision | None:
        vms = dict(self._vms())
        for gone in set(self._tracked) - set(vms):
            del self._tracked[gone]
        states: list[VmMemoryState] = []
        in_flight: list[Operation] = []
        workers: dict[str, DynamicMemoryWorker] = {}
        for name, (settings, worker) in vms.items():
            status = self.pool.latest(name)
            if status is None or not status.reported:
                continue  # its guest has not reported (yet): the balancer leaves it alone
            workers[name] = worker
            tr = self._tracked.setdefault(name, _Tracked())
            tr.committed_seen = status.committed_pages
            self._complete(name, tr, status)
            self._check_floor(name, tr, status)
            state = VmMemoryState(
                name,
                settings,
                visible_pages=status.visible_pages,
                assigned_pages=status.assigned_pages,
                ballooned_pages=status.ballooned_pages,
                report=status,
                above_target_s=tr.above_target_s,
                add_hold_s=tr.add_hold_s,
                floor_pages=tr.floor,
            )
            rest = self._remaining(state, tr)
            if rest is not None:
                in_flight.append(rest)
                state = applied(state, rest)
            states.append(state)
        if not states:
            if self.counters is not None:  # the pool is worth watching without DM VMs too
                free = mib_from_pages(self.pool.free_pages)
                self.counters.balancer.update(
                    {"Available Memory": free, "Available Memory For Balancing": free}
                )
            return None
        host = host_after(HostMemory(self.pool.free_pages, 0), in_flight)
        config = self.config if elapsed_s is None else replace(self.config, tick_s=elapsed_s)
        decision = decide(host, states, config)
        if self.counters is not None:
            self.counters.record_tick(states, decision)
        for name, timer in zip(decision.vm_ids, decision.above_target_s, strict=True):
            self._tracked[name].above_target_s = timer
        for name, hold in zip(decision.vm_ids, decision.add_hold_s, strict=True):
            self._tracked[name].add_hold_s = hold
        self._dispatch_funded(decision, states, in_flight, workers)
        self.last_decision = decision
        for listener in self.decision_listeners:
            listener(decision, states)
        return decision

    def _complete(self, name: str, tr: _Tracked, status: MemoryStatus) -> None:
        """A pending operation is done when the worker reports the target reached (or gives up
        after `pending_ticks`): count what really moved."""
        if tr.pending is None:
            return
        tr.ticks += 1
        reached = status.assigned_pages == tr.target
        news = self.pool.received(name) > tr.received_at_dispatch
        if not reached and (status.busy or not news) and tr.ticks < self._pending_ticks:
            return
        moved = abs(status.assigned_pages - tr.dispatched_from)
        if isinstance(tr.pending, Remove) and status.assigned_pages > tr.target and not status.busy:
            # the guest gave what it could: it is at its floor
            tr.floor, tr.floor_demand = status.assigned_pages, status.committed_pages
            log.info(
                "VM %s stopped at its floor of %d pages (target %d): no removal below it until "
                "its demand changes",
                name,
                status.assigned_pages,
                tr.target,
            )
        elif status.assigned_pages != tr.target:
            log.warning(
                "VM %s reached %d of target %d pages: the balancer decides again",
                name,
                status.assigned_pages,
                tr.target,
            )
        if moved and self.counters is not None:
            self.counters.record_operation(tr.pending._replace(pages=moved))
        tr.pending = None

    def _check_floor(self, name: str, tr: _Tracked, status: MemoryStatus) -> None:
        """The guest's floor holds while its demand stays where it was (by less than an
        operation) and the VM still has that memory; then it is forgotten."""
        if not tr.floor:
            return
        demand = status.committed_pages
        moved = (
            demand is None
            or tr.floor_demand is None
            or abs(demand - tr.floor_demand) >= self.config.min_operation_pages
        )
        if moved or status.assigned_pages < tr.floor:
            log.info(
                "VM %s: its status changed: its floor of %d pages is forgotten", name, tr.floor
            )
            tr.floor, tr.floor_demand = 0, None

    @staticmethod
    def _remaining(state: VmMemoryState, tr: _Tracked) -> Operation | None:
        """What is still in flight, as an operation (for `applied` and `host_after`)."""
        if tr.pending is None:
            return None
        left = tr.target - state.assigned_pages
        if left > 0:
            unballoon = min(left, state.ballooned_pages)
            return Add(state.vm, left, unballoon, left - unballoon)
        if left < 0:
            return Remove(state.vm, -left)
        return None

    def _dispatch_funded(
        self,
        decision: Decision,
        states: list[VmMemoryState],
        in_flight: list[Operation],
        workers: Mapping[str, DynamicMemoryWorker],
    ) -> None:
        """Send the decision's removes, then its adds as far as the pool has the pages now.

        The decision counts a removal in flight as already returned (so that it reclaims no
        more than is missing), but a guest may balloon slowly, or not at all (at its floor),
        while a hot-add completes at once: an add is paid only from pages free now, a pending
        remove still assigned and a pending add already assigned, so that the VMs' assigned
        memory never exceeds the budget. Adds go by weight, an add short of pages is cut to
        what is free (if still worth an operation) or waits for the next tick, which decides
        again from the statuses then."""
        for op in decision.operations:
            if isinstance(op, Remove):
                self._dispatch(op, workers[op.vm])
        by_vm = {s.vm: s for s in states}
        adds = sorted(
            (op for op in decision.operations if isinstance(op, Add)),
            key=lambda op: -by_vm[op.vm].settings.weight,
        )
        if not adds:
            return
        funds = self.pool.free_pages - sum(op.pages for op in in_flight if isinstance(op, Add))
        for op in adds:
            state = by_vm[op.vm]
            pages = min(op.pages, max(funds, 0))
            below_minimum = state.assigned_pages < state.settings.minimum_pages
            if pages < self.config.min_operation_pages and not (below_minimum and pages > 0):
                log.info(
                    "VM %s: add of %d pages waits: %d pages free until the removals in flight "
                    "are done",
                    op.vm,
                    op.pages,
                    funds,
                )
                continue
            if pages < op.pages:
                unballoon = min(pages, op.unballoon)
                op = Add(op.vm, pages, unballoon, pages - unballoon)
            if self._dispatch(op, workers[op.vm]):
                funds -= op.pages

    def _dispatch(self, op: Operation, worker: DynamicMemoryWorker) -> bool:
        """Send one operation as a target; False if it was not sent."""
        tr = self._tracked[op.vm]
        if tr.pending is not None:
            return False  # one transaction at a time per VM, as the DM protocol has it
        try:
            current = self.pool.assigned_pages(op.vm)
        except KeyError:
            return False  # the VM ended during the tick
        target = current + op.pages if isinstance(op, Add) else current - op.pages
        try:
            worker.set_memory_target(target * PAGE_SIZE)
        except (RuntimeError, OSError) as e:
            log.warning("VM %s: %s not sent: %s", op.vm, op, e)
            return False
        tr.pending, tr.target, tr.dispatched_from, tr.ticks = op, target, current, 0
        tr.received_at_dispatch = self.pool.received(op.vm)
        return True

    def status_arrived(self) -> None:
        """A worker pushed a memory status: look at it now (see `run`)."""
        self._arrived.set()

    def run(self, stop: threading.Event, look_s: float | None = None) -> None:
        """Tick every `config.tick_s` until `stop` is set; errors are logged, never fatal.

        Between ticks, look at the latest statuses when one arrives (`status_arrived`), and at
        least every `look_s` (default a quarter tick): a report that shows a VM below its target
        (a spike) is answered by an early tick, its lazy timers advanced by the time really
        elapsed, instead of waiting up to a tick for the next one (the goal: the first add
        within a second of the report)."""
        look = self.config.tick_s / 4 if look_s is None else look_s
        last = time.monotonic()
        while True:
            due = last + self.config.tick_s
            early = False
            while (left := due - time.monotonic()) > 0:
                self._arrived.wait(min(look, left))
                self._arrived.clear()
                if stop.is_set():
                    return
                if time.monotonic() < due and self._look():
                    early = True
                    break
            if stop.is_set():
                return
            now = time.monotonic()
            try:
                with self._lock:
                    self._tick(now - last if early else None)
            except Exception:  # noqa: BLE001 - one bad tick must not end balancing
                log.exception("balancer tick failed")
            last = now

    def _look(self) -> bool:
        """One look at the reports between ticks (`_spiked`), counted for `wait_looks`."""
        try:
            return self._spiked()
        finally:
            with self._looked:
                self.looks += 1
                self._looked.notify_all()

    def wait_looks(self, n: int, timeout: float) -> bool:
        """Until `run` has looked at the reports `n` times in all (False after `timeout`)."""
        with self._looked:
            return self._looked.wait_for(lambda: self.looks >= n, timeout)

    def _spiked(self) -> bool:
        """A VM whose latest report puts it below target, with no operation in flight."""
        try:
            vms = dict(self._vms())
        except Exception:  # noqa: BLE001 - the next regular tick will say what is wrong
            return False
        for name, (settings, _) in vms.items():
            with self._lock:
                tr = self._tracked.get(name)
                if tr is not None and (tr.pending is not None or tr.add_hold_s > 0):
                    continue
                seen = None if tr is None else tr.committed_seen
            st = self.pool.latest(name)
            if st is None or st.committed_pages is None or st.committed_pages == seen or st.busy:
                continue
            if st.target_pages(settings) - st.assigned_pages >= self.config.min_operation_pages:
                return True
        return False
