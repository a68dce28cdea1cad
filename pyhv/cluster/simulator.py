"""The fleet simulator: the same placement (pyhv.cluster.placement), host balancer
(pyhv.dynmem.balancer.decide_table, unchanged) and cluster balancing policy
(pyhv.cluster.policy) that run on real hosts, here on simulated hosts and VMs driven by workload
traces (pyhv.cluster.workloads), compressed in time: one host-balancer tick per `step_s` of
simulated time (the balancer's delays are in simulated seconds), the cluster policy every
`cluster_every_s`.

What is simulated, and how simply:
- a host is its memory for VMs (reserve excluded); its free pool is that less what its VMs are
  assigned; each VM's committed memory comes from the trace;
- the host balancer's operations complete within the tick they are decided in;
- a live migration completes within the step it starts in (a few seconds for GiBs at 1 GiB/s,
  against a step of a minute); its bytes are the policy's estimate (memory over the share of
  the link the guest does not dirty); a destination whose free pool cannot hold the VM's
  assigned memory refuses it (counted), as a real VMMS does.

Measured per policy: memory saved against static allocation (every VM holding its maximum,
sized for its peak, as without Dynamic Memory), VM-seconds under pressure (committed above
assigned after the tick's operations: the guest pages), host-seconds short, migrations per hour
and bytes moved. The first tick (every VM just started with its startup memory) is a warm-up,
not counted.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pyhv.cluster.placement import HostSpace, NoPlacement, VmDemand, place
from pyhv.cluster.policy import ClusterPolicy, ClusterSnapshot, Limits, check_plan
from pyhv.cluster.workloads import Fleet
from pyhv.dynmem.balancer import (
    PAGE_SIZE,
    Add,
    BalancerConfig,
    HostMemory,
    VmTable,
    decide_table,
)

GIB = 1 << 30


class SimulationError(ValueError):
    """Simulator settings that cannot run: the message says which and what to give."""


@dataclass(frozen=True)
class SimConfig:
    """`host_memory` 0: sized so that the fleet's startup memory fills the hosts."""

    hosts: int
    hours: float = 24.0
    step_s: float = 60.0
    cluster_every_s: float = 300.0
    host_memory: int = 0
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        if self.hosts < 1:
            raise SimulationError(f"--hosts {self.hosts}: give 1 or more")
        if not self.hours > 0 or not self.step_s > 0 or not self.cluster_every_s > 0:
            raise SimulationError("--hours, the step and the cluster interval must be > 0")


@dataclass
class SimResult:
    policy: str
    hosts: int
    vms: int
    hours: float
    unplaced: int
    host_memory: int
    static_bytes: int
    mean_assigned_bytes: float
    vm_seconds_under_pressure: float
    host_seconds_short: float
    migrations: int
    bytes_moved: int
    refused_moves: int
    wall_s: float
    policy_ms: list[float] = field(default_factory=list)
    series: dict[str, list[float]] = field(default_factory=dict)

    @property
    def saved_bytes(self) -> float:
        return self.static_bytes - self.mean_assigned_bytes

    @property
    def saved_percent(self) -> float:
        return 100.0 * self.saved_bytes / self.static_bytes if self.static_bytes else 0.0

    @property
    def migrations_per_hour(self) -> float:
        return self.migrations / self.hours

    @property
    def vm_hours_per_s(self) -> float:
        return self.vms * self.hours / self.wall_s if self.wall_s else 0.0

    def summary(self) -> dict[str, float | int | str]:
        return {
            "policy": self.policy,
            "hosts": self.hosts,
            "vms": self.vms,
            "hours": self.hours,
            "unplaced": self.unplaced,
            "saved_gib": round(self.saved_bytes / GIB, 1),
            "saved_percent": round(self.saved_percent, 1),
            "vm_seconds_under_pressure": round(self.vm_seconds_under_pressure),
            "host_seconds_short": round(self.host_seconds_short),
            "migrations": self.migrations,
            "migrations_per_hour": round(self.migrations_per_hour, 2),
            "gib_moved": round(self.bytes_moved / GIB, 1),
            "refused_moves": self.refused_moves,
            "vm_hours_per_s": round(self.vm_hours_per_s),
        }


def initial_placement(fleet: Fleet, hosts: int, host_memory: int) -> np.ndarray:
    """Each VM's host by pyhv.cluster.placement, largest first (-1: it fits nowhere)."""
    spaces = [HostSpace(f"host{h:03d}", host_memory, host_memory, 0) for h in range(hosts)]
    index = {s.name: i for i, s in enumerate(spaces)}
    where = np.full(len(fleet.vm_ids), -1, dtype=np.intp)
    for v in np.argsort(-fleet.startup, kind="stable").tolist():
        vm = VmDemand(fleet.vm_ids[v], int(fleet.startup[v]), int(fleet.minimum[v]))
        try:
            chosen = place(vm, spaces)
        except NoPlacement:
            continue
        h = index[chosen.name]
        where[v] = h
        spaces[h] = HostSpace(
            chosen.name, chosen.total, chosen.free - vm.startup, chosen.minimums + vm.minimum
        )
    return where


def auto_host_memory(fleet: Fleet, hosts: int) -> int:
    per_host = int(fleet.startup.sum()) / hosts
    return int(-(-per_host // GIB) * GIB)


def simulate_many(
    fleet: Fleet, policies: Sequence[ClusterPolicy], config: SimConfig
) -> list[SimResult]:
    """Every policy over the same fleet, trace and initial placement."""
    memory = config.host_memory or auto_host_memory(fleet, config.hosts)
    where = initial_placement(fleet, config.hosts, memory)
    return [simulate(fleet, p, config, memory, where) for p in policies]


def simulate(
    fleet: Fleet,
    policy: ClusterPolicy,
    config: SimConfig,
    host_memory: int,
    placement: np.ndarray,
) -> SimResult:
    started = time.perf_counter()
    placed = np.flatnonzero(placement >= 0)
    ids = tuple(fleet.vm_ids[i] for i in placed)
    n = len(ids)
    host_of = placement[placed].astype(np.intp)
    minimum = fleet.minimum[placed] // PAGE_SIZE
    maximum = fleet.maximum[placed] // PAGE_SIZE
    startup = fleet.startup[placed] // PAGE_SIZE
    dirty = fleet.dirty_bytes_per_s[placed]
    buffer = np.full(n, 20, dtype=np.int64)
    weight = np.full(n, 50, dtype=np.int64)
    visible = startup.copy()
    assigned = startup.copy()
    ballooned = np.zeros(n, dtype=np.int64)
    target = startup.copy()
    above = np.zeros(n, dtype=np.float64)
    hold = np.zeros(n, dtype=np.float64)
    last_moved = np.full(n, -np.inf)
    capacity_pages = host_memory // PAGE_SIZE
    hosts = tuple(f"host{h:03d}" for h in range(config.hosts))
    gindex = {v: i for i, v in enumerate(ids)}
    bconfig = BalancerConfig(tick_s=config.step_s)

    def group() -> list[tuple[np.ndarray, tuple[str, ...]]]:
        out = []
        for h in range(config.hosts):
            idx = np.flatnonzero(host_of == h)
            out.append((idx, tuple(ids[i] for i in idx.tolist())))
        return out

    members = group()
    steps = int(config.hours * 3600.0 / config.step_s)
    every = max(1, round(config.cluster_every_s / config.step_s))
    result = SimResult(
        policy=str(getattr(policy, "name", type(policy).__name__)),
        hosts=config.hosts,
        vms=len(fleet.vm_ids),
        hours=config.hours,
        unplaced=len(fleet.vm_ids) - n,
        host_memory=host_memory,
        static_bytes=int(fleet.maximum[placed].sum()),
        mean_assigned_bytes=0.0,
        vm_seconds_under_pressure=0.0,
        host_seconds_short=0.0,
        migrations=0,
        bytes_moved=0,
        refused_moves=0,
        wall_s=0.0,
        series={"hour": [], "assigned_gib": [], "vms_under_pressure": [], "migrations": []},
    )
    total_assigned = 0.0
    sample_every = max(1, steps // 288)
    for step in range(steps):
        t = step * config.step_s
        committed = fleet.committed(t)[placed] // PAGE_SIZE
        short_hosts = 0
        for idx, names in members:
            if not idx.size:
                continue
            table = VmTable(
                vm_ids=names,
                minimum=minimum[idx],
                maximum=maximum[idx],
                buffer=buffer[idx],
                weight=weight[idx],
                visible=visible[idx],
                assigned=assigned[idx],
                ballooned=ballooned[idx],
                committed=committed[idx],
                above_target_s=above[idx],
                add_hold_s=hold[idx],
            )
            free = max(0, capacity_pages - int(assigned[idx].sum()))
            d = decide_table(HostMemory(free, 0), table, bconfig)
            short_hosts += d.host_short
            ops = d.operations
            if ops:
                # Carried out at once, as columns (each VM has at most one operation a tick).
                at = np.fromiter((gindex[o.vm] for o in ops), np.intp, len(ops))
                pages = np.fromiter((o.pages for o in ops), np.int64, len(ops))
                add = np.fromiter((isinstance(o, Add) for o in ops), bool, len(ops))
                hot = np.fromiter(
                    (o.hot_add if isinstance(o, Add) else 0 for o in ops), np.int64, len(ops)
                )
                assigned[at] += np.where(add, pages, -pages)
                visible[at] += hot
                ballooned[at] += np.where(add, hot - pages, pages)
            above[idx] = d.above_target_s
            hold[idx] = d.add_hold_s
            target[idx] = d.target_pages
        under = int((committed > assigned).sum())
        if step:  # the first tick, every VM just started with its startup memory, is the warm-up
            result.vm_seconds_under_pressure += under * config.step_s
            result.host_seconds_short += short_hosts * config.step_s
        total_assigned += float(assigned.sum()) * PAGE_SIZE

        if step % every == 0:
            snap = ClusterSnapshot(
                now=t,
                hosts=hosts,
                capacity=np.full(config.hosts, host_memory, dtype=np.int64),
                vm_ids=ids,
                vm_host=host_of,
                assigned=assigned * PAGE_SIZE,
                target=target * PAGE_SIZE,
                minimum=minimum * PAGE_SIZE,
                dirty_bytes_per_s=dirty,
                last_moved=last_moved,
            )
            t0 = time.perf_counter()
            plan = policy.plan(snap)
            result.policy_ms.append((time.perf_counter() - t0) * 1e3)
            moves = check_plan(snap, plan, config.limits)
            if moves:
                used = np.bincount(host_of, weights=assigned, minlength=config.hosts)
                for m in moves:
                    i, dst = gindex[m.vm], hosts.index(m.destination)
                    if capacity_pages - used[dst] < assigned[i]:
                        result.refused_moves += 1
                        continue
                    used[dst] += assigned[i]
                    used[host_of[i]] -= assigned[i]
                    host_of[i] = dst
                    last_moved[i] = t
                    result.migrations += 1
                    result.bytes_moved += m.bytes or int(assigned[i]) * PAGE_SIZE
                members = group()
        if step and step % sample_every == 0:
            s = result.series
            s["hour"].append(t / 3600.0)
            s["assigned_gib"].append(float(assigned.sum()) * PAGE_SIZE / GIB)
            s["vms_under_pressure"].append(float(under))
            s["migrations"].append(float(result.migrations))
    result.mean_assigned_bytes = total_assigned / max(steps, 1)
    result.wall_s = time.perf_counter() - started
    return result
