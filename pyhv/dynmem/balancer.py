"""The Dynamic Memory balancer: Hyper-V's per-second decision of how much memory to add to or
remove from each VM. Pure decision code: immutable state in, operations out.

Units are 4 KiB pages, the unit of the Dynamic Memory protocol. Rules (docs/balancer.md):

- demand = the committed pages of the VM's last status report; pressure = demand / assigned x 100;
  target = demand x (1 + buffer %), clamped to [minimum, maximum] (both formulas in
  pyhv.dynmem.status, the one place they are written).
- Below target: add, unballooning first (up to what the balloon holds), then hot-adding the rest
  (hot-add grows the guest-visible memory, which may never exceed maximum).
- Add pacing (off unless `max_add_pages` is set): one add gives at most `max_add_pages`; a VM
  that wanted more waits `add_settle_s` (x `time_scale`) before its next add, and gets one then
  only if it is still below target (the book's second jump, "the first addition did not fully
  relieve the pressure").
- Above target: remove by ballooning, lazily: only after the VM has stayed above target for
  `remove_delay_s` (x `time_scale`), and at most `remove_step_pages` per tick.
- Host short (the adds wished exceed the free pool less the host reserve): the buffer is dropped
  first, higher-weight VMs get memory first, and memory is taken back (at once, not lazily) from
  other VMs' buffers and then from lower-weight VMs, never below their minimum.
- The guest's floor: a VM whose guest last answered a balloon request short (it keeps enough
  memory to run, as Linux's hv_balloon does) has `floor_pages`; no removal, lazy or not, goes
  below it. The caller keeps it until the VM's status changes (pyhv.vmms.balancing), so a guest
  at its floor is not asked again every tick.

The arithmetic runs on numpy columns so that a tick over 10 000 VMs stays in milliseconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import NamedTuple, Protocol

import numpy as np
import numpy.typing as npt

from pyhv.dynmem.status import pressure_percent, target_pages

PAGE_SIZE = 4096
PAGES_PER_MIB = (1 << 20) // PAGE_SIZE
BUFFER_PERCENT_RANGE = (5, 2000)
WEIGHT_RANGE = (0, 100)
DEFAULT_BUFFER_PERCENT = 20
DEFAULT_WEIGHT = 50

_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


def pages_from_mib(mib: float) -> int:
    """Pages in `mib` MiB (rounded down)."""
    return int(mib * PAGES_PER_MIB)


def mib_from_pages(pages: float) -> float:
    return pages / PAGES_PER_MIB


class SettingsError(ValueError):
    """A Dynamic Memory setting is out of range; the message names the value and the fix."""


def _check_pages(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SettingsError(f"{name} must be a whole number of pages >= 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class MemorySettings:
    """A VM's Dynamic Memory settings (Set-VMMemory): pages, buffer in %, weight (priority)."""

    startup_pages: int
    minimum_pages: int
    maximum_pages: int
    buffer_percent: int = DEFAULT_BUFFER_PERCENT
    weight: int = DEFAULT_WEIGHT

    def __post_init__(self) -> None:
        for name in ("startup_pages", "minimum_pages", "maximum_pages"):
            _check_pages(name, getattr(self, name))
        if self.minimum_pages == 0:
            raise SettingsError("minimum_pages must be > 0: a running VM needs some memory")
        if not self.minimum_pages <= self.startup_pages <= self.maximum_pages:
            raise SettingsError(
                "memory settings must satisfy minimum <= startup <= maximum, got "
                f"minimum={self.minimum_pages} startup={self.startup_pages} "
                f"maximum={self.maximum_pages} pages: lower minimum or raise maximum"
            )
        lo, hi = BUFFER_PERCENT_RANGE
        if not isinstance(self.buffer_percent, int) or not lo <= self.buffer_percent <= hi:
            raise SettingsError(
                f"buffer_percent must be a whole percentage in {lo}..{hi} (Hyper-V's range), "
                f"got {self.buffer_percent!r}"
            )
        lo, hi = WEIGHT_RANGE
        if not isinstance(self.weight, int) or not lo <= self.weight <= hi:
            raise SettingsError(
                f"weight (memory priority) must be a whole number in {lo}..{hi} "
                f"(default {DEFAULT_WEIGHT}), got {self.weight!r}"
            )

    @classmethod
    def from_mib(
        cls,
        startup: float,
        minimum: float,
        maximum: float,
        buffer_percent: int = DEFAULT_BUFFER_PERCENT,
        weight: int = DEFAULT_WEIGHT,
    ) -> MemorySettings:
        return cls(
            pages_from_mib(startup),
            pages_from_mib(minimum),
            pages_from_mib(maximum),
            buffer_percent,
            weight,
        )


@dataclass(frozen=True, slots=True)
class StatusReport:
    """A simulated guest's status report, in pages: the two figures the balancer reads. A real
    VM's report comes as its pyhv.dynmem.status.MemoryStatus, which the balancer takes as is."""

    committed_pages: int
    available_pages: int = 0


class Report(Protocol):
    """What the balancer reads of a report: a simulated StatusReport or a MemoryStatus (whose
    figures are None until the guest reported: the VM then counts as not reporting)."""

    @property
    def committed_pages(self) -> int | None: ...

    @property
    def available_pages(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class VmMemoryState:
    """One dynamic-memory VM as the balancer sees it at a tick.

    `assigned_pages` is the memory backing the guest ("Physical Memory") once the operations in
    flight complete; `visible_pages` what the guest OS believes it has (only grows);
    `ballooned_pages` what its balloon holds (can be unballooned). `above_target_s` is the lazy
    timer returned by the previous tick's decision (0 for a new VM); `add_hold_s` likewise the
    add-pacing timer (seconds left before the VM may be given more after a capped add);
    `floor_pages` the assigned memory below which its guest last refused to balloon (0: none).
    """

    vm: str
    settings: MemorySettings
    visible_pages: int
    assigned_pages: int
    ballooned_pages: int = 0
    report: Report | None = None
    above_target_s: float = 0.0
    add_hold_s: float = 0.0
    floor_pages: int = 0

    def __post_init__(self) -> None:
        for name in ("visible_pages", "assigned_pages", "ballooned_pages", "floor_pages"):
            _check_pages(name, getattr(self, name))
        if self.ballooned_pages > self.visible_pages:
            raise SettingsError(
                f"VM {self.vm!r}: ballooned_pages={self.ballooned_pages} exceeds "
                f"visible_pages={self.visible_pages}: the balloon can only hold visible memory"
            )


@dataclass(frozen=True, slots=True)
class HostMemory:
    """The memory manager's pool: free pages and the reserve kept for the host itself."""

    free_pages: int
    reserve_pages: int = 0

    def __post_init__(self) -> None:
        _check_pages("free_pages", self.free_pages)
        _check_pages("reserve_pages", self.reserve_pages)

    @property
    def available_pages(self) -> int:
        """What the balancer may hand out: the free pool less the host reserve."""
        return max(0, self.free_pages - self.reserve_pages)


@dataclass(frozen=True, slots=True)
class BalancerConfig:
    """Tunables. The defaults reproduce the book's "Watching Dynamic Memory" timeline: additions
    within a tick of a spike, and a trim a few minutes after the load ends.

    `time_scale` multiplies the lazy-removal delay and the add settle time: 0.1 turns 180 s
    into 18 s (the experiment's --time-scale).

    Add pacing: `max_add_pages` (0: no limit) is the most one add gives; a VM that wanted more
    gets its next add `add_settle_s` later at the earliest, if still below target then.
    Hyper-V's constants are not public; `BOOK_PACING` (512 MiB, 30 s) reproduces the book's
    second jump "about 30 seconds later"."""

    tick_s: float = 1.0
    remove_delay_s: float = 180.0
    remove_step_pages: int = 128 * PAGES_PER_MIB
    min_operation_pages: int = PAGES_PER_MIB
    time_scale: float = 1.0
    max_add_pages: int = 0
    add_settle_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.tick_s > 0:
            raise SettingsError(f"tick_s must be > 0 seconds, got {self.tick_s!r}")
        if not self.remove_delay_s >= 0:
            raise SettingsError(f"remove_delay_s must be >= 0 seconds, got {self.remove_delay_s!r}")
        if not self.time_scale > 0:
            raise SettingsError(
                f"time_scale must be > 0 (0.1 makes delays ten times shorter), got {self.time_scale!r}"
            )
        if not isinstance(self.remove_step_pages, int) or self.remove_step_pages < 1:
            raise SettingsError(
                f"remove_step_pages must be a whole number >= 1, got {self.remove_step_pages!r}"
            )
        _check_pages("min_operation_pages", self.min_operation_pages)
        _check_pages("max_add_pages", self.max_add_pages)
        if not self.add_settle_s >= 0:
            raise SettingsError(f"add_settle_s must be >= 0 seconds, got {self.add_settle_s!r}")

    @property
    def effective_remove_delay_s(self) -> float:
        return self.remove_delay_s * self.time_scale

    @property
    def effective_add_settle_s(self) -> float:
        return self.add_settle_s * self.time_scale


#: Add pacing that reproduces the book's timeline (a second jump about 30 s after the first).
BOOK_PACING = {"max_add_pages": 512 * PAGES_PER_MIB, "add_settle_s": 30.0}


class Add(NamedTuple):
    """Give `pages` to `vm`: `unballoon` pages from its balloon first, then `hot_add` new ones.
    (Operations are NamedTuples: immutable, and cheap to make by the thousand.)"""

    vm: str
    pages: int
    unballoon: int
    hot_add: int


class Remove(NamedTuple):
    """Take `pages` from `vm` by ballooning."""

    vm: str
    pages: int


Operation = Add | Remove


@dataclass(frozen=True, slots=True)
class Decision:
    """One tick's result. Per-VM tuples are aligned with the input order (`vm_ids`)."""

    vm_ids: tuple[str, ...]
    operations: tuple[Operation, ...]
    pressure: tuple[float, ...]
    target_pages: tuple[int, ...]
    above_target_s: tuple[float, ...]
    host_short: bool
    available_pages: int
    available_for_balancing_pages: int
    average_pressure: float
    system_pressure: float
    add_hold_s: tuple[float, ...] = ()
    _by_vm: dict[str, Operation] = field(default_factory=dict, repr=False, compare=False)

    def operation_for(self, vm: str) -> Operation | None:
        """The operation decided for `vm`, or None."""
        if not self._by_vm and self.operations:
            self._by_vm.update((op.vm, op) for op in self.operations)
        return self._by_vm.get(vm)


@dataclass(frozen=True, slots=True, eq=False)
class VmTable:
    """The same state as a sequence of VmMemoryState, one numpy column per field, for fleets
    of thousands of (simulated) VMs: building per-VM objects would cost more than deciding.
    A VM without a status report has `committed` = -1."""

    vm_ids: tuple[str, ...]
    minimum: _I64
    maximum: _I64
    buffer: _I64
    weight: _I64
    visible: _I64
    assigned: _I64
    ballooned: _I64
    committed: _I64
    above_target_s: _F64
    add_hold_s: _F64 | None = None
    floor: _I64 | None = None  #: the guest's floor (pages; 0: none), see VmMemoryState

    def __post_init__(self) -> None:
        n = len(self.vm_ids)
        if self.add_hold_s is None:
            object.__setattr__(self, "add_hold_s", np.zeros(n, dtype=np.float64))
        if self.floor is None:
            object.__setattr__(self, "floor", np.zeros(n, dtype=np.int64))
        for name in _TABLE_COLUMNS:
            column = getattr(self, name)
            if np.shape(column) != (n,):
                raise SettingsError(
                    f"VmTable column {name} has shape {np.shape(column)}, expected ({n},) "
                    "like vm_ids: give one value per VM"
                )
        if n == 0:
            return
        if len(set(self.vm_ids)) != n:
            twice = next(v for v, k in Counter(self.vm_ids).items() if k > 1)
            raise SettingsError(f"VM {twice!r} appears twice in one tick: give each VM once")
        bad = np.flatnonzero(
            (self.minimum < 1)
            | (self.minimum > self.maximum)
            | (self.ballooned < 0)
            | (self.ballooned > self.visible)
            | (self.assigned < 0)
            | (self.floor < 0)  # type: ignore[operator]
            | (self.buffer < BUFFER_PERCENT_RANGE[0])
            | (self.buffer > BUFFER_PERCENT_RANGE[1])
            | (self.weight < WEIGHT_RANGE[0])
            | (self.weight > WEIGHT_RANGE[1])
        )
        if bad.size:
            raise SettingsError(
                f"VmTable row for VM {self.vm_ids[int(bad[0])]!r} is out of range: need "
                "1 <= minimum <= maximum, 0 <= ballooned <= visible, buffer 5..2000, weight 0..100"
            )

    @classmethod
    def from_states(cls, vms: Sequence[VmMemoryState]) -> VmTable:
        if not vms:
            empty = np.zeros(0, dtype=np.int64)
            e = empty
            return cls((), e, e, e, e, e, e, e, e, np.zeros(0, dtype=np.float64))
        # One C-level pass per column (attrgetter + fromiter): no per-VM tuples are built, so
        # the garbage collector is not woken up by thousands of new containers.
        n = len(vms)
        settings = list(map(_SETTINGS, vms))
        reports = map(_REPORT, vms)

        def ints(getter: attrgetter[int], objects: Iterable[object]) -> _I64:
            return np.fromiter(map(getter, objects), dtype=np.int64, count=n)

        return cls(
            vm_ids=tuple(map(_VM, vms)),
            minimum=ints(_MINIMUM, settings),
            maximum=ints(_MAXIMUM, settings),
            buffer=ints(_BUFFER, settings),
            weight=ints(_WEIGHT, settings),
            visible=ints(_VISIBLE, vms),
            assigned=ints(_ASSIGNED, vms),
            ballooned=ints(_BALLOONED, vms),
            committed=np.fromiter(
                (
                    -1 if r is None or r.committed_pages is None else r.committed_pages
                    for r in reports
                ),
                np.int64,
                count=n,
            ),
            above_target_s=np.fromiter(map(_TIMER, vms), dtype=np.float64, count=n),
            add_hold_s=np.fromiter(map(_HOLD, vms), dtype=np.float64, count=n),
            floor=ints(_FLOOR, vms),
        )


_TABLE_COLUMNS = (
    "minimum",
    "maximum",
    "buffer",
    "weight",
    "visible",
    "assigned",
    "ballooned",
    "committed",
    "above_target_s",
    "add_hold_s",
    "floor",
)
_VM = attrgetter("vm")
_SETTINGS = attrgetter("settings")
_REPORT = attrgetter("report")
_TIMER = attrgetter("above_target_s")
_HOLD = attrgetter("add_hold_s")
_FLOOR = attrgetter("floor_pages")
_MINIMUM = attrgetter("minimum_pages")
_MAXIMUM = attrgetter("maximum_pages")
_BUFFER = attrgetter("buffer_percent")
_WEIGHT = attrgetter("weight")
_VISIBLE = attrgetter("visible_pages")
_ASSIGNED = attrgetter("assigned_pages")
_BALLOONED = attrgetter("ballooned_pages")


def applied(state: VmMemoryState, op: Operation | None) -> VmMemoryState:
    """The VM as it will be once `op` completes: what to pass as its state while `op` is in
    flight (and how a simulation carries an operation out)."""
    if op is None:
        return state
    if op.vm != state.vm:
        raise ValueError(f"operation for VM {op.vm!r} applied to VM {state.vm!r}")
    if isinstance(op, Add):
        return replace(
            state,
            visible_pages=state.visible_pages + op.hot_add,
            assigned_pages=state.assigned_pages + op.pages,
            ballooned_pages=state.ballooned_pages - op.unballoon,
        )
    return replace(
        state,
        assigned_pages=state.assigned_pages - op.pages,
        ballooned_pages=state.ballooned_pages + op.pages,
    )


def host_after(host: HostMemory, operations: Sequence[Operation]) -> HostMemory:
    """The free pool once `operations` complete (adds take from it, removes return to it)."""
    delta = sum(-op.pages if isinstance(op, Add) else op.pages for op in operations)
    return replace(host, free_pages=host.free_pages + delta)


def decide(
    host: HostMemory, vms: Sequence[VmMemoryState], config: BalancerConfig | None = None
) -> Decision:
    """Decide this tick's operations for `vms` (the VMs with Dynamic Memory enabled)."""
    return decide_table(host, VmTable.from_states(vms), config)


def _greedy(amounts: _I64, order: npt.NDArray[np.intp], budget: int) -> _I64:
    """Hand `budget` out to `amounts` in `order`, each taking all it wants while it lasts."""
    wants = amounts[order]
    before = np.cumsum(wants) - wants
    granted = np.zeros_like(amounts)
    granted[order] = np.clip(budget - before, 0, wants)
    return granted


def decide_table(host: HostMemory, c: VmTable, config: BalancerConfig | None = None) -> Decision:
    """`decide` over a VmTable."""
    config = config or BalancerConfig()
    ids = c.vm_ids
    n = len(ids)
    if n == 0:
        avail = host.available_pages
        return Decision((), (), (), (), (), False, avail, avail, 0.0, 0.0, ())
    has_report = c.committed >= 0
    # Without a report the demand is unknown: hold the VM where it is (within its limits).
    demand = np.where(has_report, c.committed, c.assigned)
    need = np.clip(demand, c.minimum, c.maximum)
    # Without a report the VM is held where it is: its target is its demand (= assigned).
    target = target_pages(demand, np.where(has_report, c.buffer, 0), c.minimum, c.maximum)
    pressure = np.where(has_report, pressure_percent(demand, c.assigned), 0.0)
    # No removal goes below the minimum, nor below the floor the guest last answered with.
    floor = c.floor if c.floor is not None else np.zeros(n, dtype=np.int64)
    lowest = np.maximum(c.minimum, floor)

    # What an add can deliver: the balloon, plus hot-add up to maximum guest-visible memory.
    room = np.maximum(c.maximum - c.assigned, 0)
    capacity = np.minimum(c.ballooned + np.maximum(c.maximum - c.visible, 0), room)
    min_op = config.min_operation_pages
    below_minimum = c.assigned < c.minimum
    short_by = target - c.assigned
    wants_add = (short_by >= min_op) | (below_minimum & (short_by > 0))
    # Add pacing: a VM still settling after a capped add waits (unless below its minimum).
    hold_before = c.add_hold_s if c.add_hold_s is not None else np.zeros(n)
    hold_left = np.maximum(hold_before - config.tick_s, 0.0)
    wants_add &= (hold_left <= 1e-9) | below_minimum
    want = np.where(wants_add, np.minimum(short_by, capacity), 0)
    cap = config.max_add_pages
    capped = want > cap if cap else np.zeros(n, dtype=bool)
    if cap:
        want = np.minimum(want, cap)
    want_need = np.minimum(np.clip(need - c.assigned, 0, None), want)

    available = host.available_pages
    total_want = int(want.sum())
    reclaim = np.zeros(n, dtype=np.int64)
    host_short = total_want > available
    if not host_short:
        grant = want
    else:
        # Short: demand before buffer, higher weight (then higher pressure) first.
        order = np.lexsort((np.arange(n), -pressure, -c.weight))
        grant_need = _greedy(want_need, order, available)
        left = available - int(grant_need.sum())
        grant = grant_need + _greedy(want - want_need, order, left)
        unmet = want_need - grant_need
        if unmet.any():
            reclaim = _reclaim(c, need, unmet, pressure, lowest)
        # A grant too small to be worth an operation stays in the pool.
        grant = np.where((grant >= min_op) | (below_minimum & (grant > 0)), grant, 0)

    # Lazy trim: count the time above target; remove a step once the delay has passed.
    over = c.assigned - np.maximum(target, floor)
    above = (over >= min_op) & has_report
    timer = np.where(above, c.above_target_s + config.tick_s, 0.0)
    due = above & (timer >= config.effective_remove_delay_s)
    lazy = np.where(due, np.minimum(over, config.remove_step_pages), 0)
    remove = np.maximum(lazy, reclaim)

    # Build the few operations from plain lists: indexing numpy scalars one by one is slow.
    changed = np.flatnonzero((grant > 0) | (remove > 0))
    operations: list[Operation] = []
    for i, g, r, b in zip(
        changed.tolist(),
        grant[changed].tolist(),
        remove[changed].tolist(),
        c.ballooned[changed].tolist(),
        strict=True,
    ):
        if g > 0:
            unballoon = min(g, b)
            operations.append(Add(ids[i], g, unballoon, g - unballoon))
        else:
            operations.append(Remove(ids[i], r))

    hold = np.where(
        capped & (grant > 0),
        config.effective_add_settle_s,
        np.where(hold_left <= 1e-9, 0.0, hold_left),
    )

    reported = has_report
    total_assigned = int(c.assigned[reported].sum())
    return Decision(
        vm_ids=ids,
        operations=tuple(operations),
        pressure=tuple(pressure.tolist()),
        target_pages=tuple(target.tolist()),
        above_target_s=tuple(timer.tolist()),
        host_short=host_short,
        available_pages=available,
        available_for_balancing_pages=available + int((c.assigned - target).sum()),
        average_pressure=float(pressure[reported].mean()) if reported.any() else 0.0,
        system_pressure=(
            float(demand[reported].sum() * 100.0 / total_assigned) if total_assigned else 0.0
        ),
        add_hold_s=tuple(hold.tolist()),
    )


def _reclaim(c: VmTable, need: _I64, unmet: _I64, pressure: _F64, lowest: _I64) -> _I64:
    """Pages to take back at once so that unmet demand can be met next tick: first every
    VM's buffer (lowest weight, then lowest pressure first), then demand memory of VMs with a
    strictly lower weight than the VM in need, never below their `lowest` (minimum, or the
    guest's floor)."""
    n = len(unmet)
    total_unmet = int(unmet.sum())
    ascending = np.lexsort((np.arange(n), pressure, c.weight))
    surplus = np.clip(c.assigned - np.maximum(need, lowest), 0, None)
    take = _greedy(surplus, ascending, total_unmet)
    covered = int(take.sum())
    if covered >= total_unmet:
        return take

    # The buffers did not cover it: the highest-weight needs are the ones the buffers paid for.
    # Two pointers: needy VMs by descending weight, donors by ascending weight.
    needy = np.flatnonzero(unmet > 0)
    needy = needy[np.argsort(-c.weight[needy], kind="stable")]
    demanded = np.clip(np.minimum(c.assigned, need) - lowest, 0, None)
    donors = ascending[demanded[ascending] > 0]
    weight = c.weight.tolist()
    spare = demanded[donors].tolist()
    donor_ids = donors.tolist()
    paid = covered
    d = 0
    for i, rest in zip(needy.tolist(), unmet[needy].tolist(), strict=True):
        from_buffers = min(rest, paid)
        paid -= from_buffers
        rest -= from_buffers
        while rest > 0 and d < len(donor_ids) and weight[donor_ids[d]] < weight[i]:
            got = min(rest, spare[d])
            spare[d] -= got
            take[donor_ids[d]] += got
            rest -= got
            if spare[d] == 0:
                d += 1
    return take
