"""The cluster balancer's interface: a policy is pure code that takes a `ClusterSnapshot` and
returns a `Plan` of live migrations. The same policy object runs on the elected leader against
real hosts (`pyhv cluster balance`) and in the fleet simulator (`pyhv cluster simulate`).

Write your own (docs/cluster.md, "A policy of your own")::

    # mypolicy.py
    from pyhv.cluster.policy import ClusterSnapshot, Move, Plan

    class Policy:
        name = "mine"
        def plan(self, s: ClusterSnapshot) -> Plan:
            ...  # read s.hosts, s.capacity, s.vm_ids, s.vm_host, s.assigned, s.target, ...
            return Plan((Move(vm, source, destination, bytes_to_move),))

    policy = Policy()

and give `--policy mypolicy.py` (pyhv.cluster.policies loads it) (or `--policy package.module:attribute`). A module may instead
define a function `plan(snapshot) -> Plan`. The caller checks every plan (`check_plan`): a move
of an unknown VM, to its own host, of a VM already moving, or past the limits is refused with the
reason; a policy cannot make the executor do what the limits forbid.

Units are bytes and seconds. Columns are numpy arrays aligned with `vm_ids` / `hosts`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


class PolicyError(ValueError):
    """A policy that cannot be loaded, or a plan that breaks the rules: the message says which
    move and why."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What any plan must respect.

    - `in_flight_per_host`: migrations a host takes part in at once (as source or destination);
    - `in_flight_cluster`: migrations in the whole cluster at once;
    - `min_interval_s`: a VM moves at most once per this interval;
    - hysteresis: a host counts as short only when its VMs' targets exceed its memory by more
      than `short_above` (a fraction of its memory), and a move may fill a destination only up
      to (1 - `headroom`) of its memory, so a move does not make the destination short;
    - `bandwidth_bytes_per_s`: the migration link, for the cost of a move (pre-copy sends a
      VM's memory again as fast as the guest dirties it)."""

    in_flight_per_host: int = 2
    in_flight_cluster: int = 10
    min_interval_s: float = 900.0
    short_above: float = 0.02
    headroom: float = 0.10
    bandwidth_bytes_per_s: float = 1.0 * (1 << 30)


@dataclass(frozen=True, slots=True, eq=False)
class ClusterSnapshot:
    """The cluster at one moment, as the leader reads it from etcd (or the simulator has it).

    Hosts: `hosts` names, `capacity` memory for VMs (reserve excluded). VMs: `vm_ids`,
    `vm_host` (index into hosts), `assigned` (memory it holds), `target` (what its host's
    balancer wants it to have: demand plus buffer, within minimum..maximum), `minimum`,
    `dirty_bytes_per_s`, `last_moved` (time of its last move, -inf if never). `moving`: VMs
    (indices) in a migration now, with `moving_to` their destinations (host indices)."""

    now: float
    hosts: tuple[str, ...]
    capacity: _I64
    vm_ids: tuple[str, ...]
    vm_host: npt.NDArray[np.intp]
    assigned: _I64
    target: _I64
    minimum: _I64
    dirty_bytes_per_s: _F64
    last_moved: _F64
    moving: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, dtype=np.intp))
    moving_to: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, dtype=np.intp))

    def host_targets(self) -> _I64:
        """Per host: the targets of its VMs, a VM on its way counted at its destination."""
        where = self.vm_host.copy()
        if self.moving.size:
            where[self.moving] = self.moving_to
        return np.bincount(where, weights=self.target, minlength=len(self.hosts)).astype(np.int64)

    def deficit(self) -> _I64:
        """Per host: how far its VMs' targets exceed its memory (negative: room)."""
        return self.host_targets() - self.capacity


@dataclass(frozen=True, slots=True)
class Move:
    """Live-migrate `vm` from `source` to `destination`; `bytes` the memory expected on the
    wire, `relief` the shortfall it removes at the source."""

    vm: str
    source: str
    destination: str
    bytes: int = 0
    relief: int = 0


@dataclass(frozen=True, slots=True)
class Plan:
    """A policy's answer: the moves to start now, and notes (why a short host stays short)."""

    moves: tuple[Move, ...] = ()
    notes: tuple[str, ...] = ()


class ClusterPolicy(Protocol):
    """A cluster balancing policy: `name` for reports, `plan` pure (no I/O, no sleeping)."""

    name: str

    def plan(self, snapshot: ClusterSnapshot) -> Plan: ...


class HostOnly:
    """Hyper-V's rules per host and nothing across hosts: never moves a VM (the baseline)."""

    name = "host-only"

    def plan(self, snapshot: ClusterSnapshot) -> Plan:
        return Plan()


def check_plan(snapshot: ClusterSnapshot, plan: Plan, limits: Limits) -> list[Move]:
    """The moves of `plan` that may start, in order; PolicyError for the first that breaks a
    rule (unknown VM or host, wrong source, same host, VM moving or moved too recently, a limit
    passed)."""
    index = {v: i for i, v in enumerate(snapshot.vm_ids)}
    host_index = {h: i for i, h in enumerate(snapshot.hosts)}
    busy = np.zeros(len(snapshot.hosts), dtype=np.int64)
    moving = set(snapshot.moving.tolist())
    for vm, dest in zip(snapshot.moving.tolist(), snapshot.moving_to.tolist(), strict=True):
        busy[snapshot.vm_host[vm]] += 1
        busy[dest] += 1
    in_flight = len(moving)
    out = []
    for m in plan.moves:
        i = index.get(m.vm)
        if i is None:
            raise PolicyError(f"plan moves VM {m.vm!r}, which the cluster does not have")
        src, dst = host_index.get(m.source), host_index.get(m.destination)
        if src is None or dst is None:
            raise PolicyError(
                f"plan moves {m.vm} between unknown hosts {m.source}->{m.destination}"
            )
        if snapshot.vm_host[i] != src:
            raise PolicyError(
                f"plan moves {m.vm} from {m.source}, but it runs on {snapshot.hosts[snapshot.vm_host[i]]}"
            )
        if src == dst:
            raise PolicyError(f"plan moves {m.vm} to the host it runs on ({m.source})")
        if i in moving:
            raise PolicyError(f"plan moves {m.vm}, which is moving already")
        if snapshot.now - snapshot.last_moved[i] < limits.min_interval_s:
            raise PolicyError(
                f"plan moves {m.vm} again {snapshot.now - snapshot.last_moved[i]:.0f} s after its "
                f"last move (the minimum interval is {limits.min_interval_s:.0f} s)"
            )
        if in_flight >= limits.in_flight_cluster:
            raise PolicyError(
                f"plan moves {m.vm} past the cluster's limit of {limits.in_flight_cluster} "
                "migrations in flight"
            )
        if max(busy[src], busy[dst]) >= limits.in_flight_per_host:
            raise PolicyError(
                f"plan moves {m.vm} {m.source}->{m.destination} past the limit of "
                f"{limits.in_flight_per_host} migrations in flight per host"
            )
        busy[src] += 1
        busy[dst] += 1
        in_flight += 1
        moving.add(i)
        out.append(m)
    return out


def names(policies: Sequence[ClusterPolicy]) -> list[str]:
    return [str(getattr(p, "name", type(p).__name__)) for p in policies]
