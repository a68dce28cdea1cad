"""The cluster balancer's standing leader: with `pyhv vmms serve --cluster E --host N
--balance-every S`, every host's VMMS campaigns for the leadership under its own host lease (so
leadership ends with the host), and the leader decides every S seconds: it reads the snapshot,
asks the policy for a plan, checks it against the limits and carries it out
(pyhv.cluster.executor). `decide` is shared with `pyhv cluster balance`. Every HA_EVERY_S it
also restarts the highly available VMs of hosts whose lease ended (pyhv.cluster.ha).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pyhv.cluster import election, ha
from pyhv.cluster.etcd import Etcd, EtcdError
from pyhv.cluster.executor import Outcome, execute
from pyhv.cluster.policy import ClusterPolicy, ClusterSnapshot, Limits, Move, Plan, check_plan
from pyhv.cluster.provision import HostTokens, ProvisionError
from pyhv.cluster.records import HostRecord, RecordError
from pyhv.cluster.snapshot import (
    read_hosts,
    read_last_moved,
    read_migrations,
    read_owners,
    snapshot,
)
from pyhv.counters.registry import CounterDef, CounterRegistry, CounterSetDef
from pyhv.vmms.client import ClientTls

log = logging.getLogger("pyhv.cluster")

#: How often the leader looks for the HA VMs of hosts whose lease ended (seconds).
HA_EVERY_S = 0.5

#: The cluster balancer's work, counted on the host that led when it happened.
CLUSTER_SET = CounterSetDef(
    "pyhv Cluster",
    (
        CounterDef("Leader", "1 while this host leads the cluster balancer", "count"),
        CounterDef("Decisions", "plans made as leader", "count", "cumulative"),
        CounterDef("Migrations", "live migrations the leader carried out", "count", "cumulative"),
        CounterDef(
            "Migrations Failed", "moves that failed or were in doubt", "count", "cumulative"
        ),
        CounterDef("Bytes Moved", "memory the moves were expected to send", "bytes", "cumulative"),
        CounterDef("Decision Time", "the last plan's time (policy and check)", "seconds"),
        CounterDef(
            "VMs Under Pressure",
            "VMs whose demand exceeds their assigned memory, at the last decision",
            "count",
        ),  # fmt: skip
        CounterDef(
            "VM-Seconds Under Pressure",
            "VMs under pressure x the time between decisions",
            "seconds",
            "cumulative",
        ),  # fmt: skip
        CounterDef(
            "HA Restarts",
            "VMs of dead hosts started elsewhere by the leader",
            "count",
            "cumulative",
        ),  # fmt: skip
        CounterDef(
            "HA Restarts Failed",
            "HA restarts a host refused (the VM stays off)",
            "count",
            "cumulative",
        ),  # fmt: skip
    ),
    instance_label=None,
    prometheus_name="pyhv_cluster",
)


@dataclass(frozen=True)
class Decision:
    hosts: list[HostRecord]
    snapshot: ClusterSnapshot
    plan: Plan
    moves: list[Move]
    seconds: float


def decide(etcd: Etcd, policy: ClusterPolicy, limits: Limits) -> Decision:
    """Read the cluster, ask the policy, check its plan (PolicyError if it breaks a rule)."""
    hosts = read_hosts(etcd)
    snap = snapshot(
        hosts, read_migrations(etcd), last_moved=read_last_moved(etcd), owners=read_owners(etcd)
    )
    t0 = time.perf_counter()
    plan = policy.plan(snap)
    moves = check_plan(snap, plan, limits)
    return Decision(hosts, snap, plan, moves, time.perf_counter() - t0)


@dataclass
class StandingLeader:
    """Campaigns under the host's lease (`lease()`: 0 while the host has none) and, as leader,
    decides and carries out every `every_s` seconds on a thread of its own."""

    etcd: Etcd
    host: str
    lease: Callable[[], int]
    policy: ClusterPolicy
    #: The hosts' API tokens, read again at each plan with moves (hosts join, tokens rotate).
    tokens: Callable[[], Mapping[str, HostTokens]]
    every_s: float
    limits: Limits = field(default_factory=Limits)
    registry: CounterRegistry | None = None
    #: Mutual TLS to the other hosts (this host's certificate, the cluster CA), or None.
    tls: ClientTls | None = None
    outcomes: list[Outcome] = field(default_factory=list)
    restarts: list[ha.Restart] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._held: election.Leadership | None = None
        self._thread: threading.Thread | None = None
        self.counts: dict[str, float] = dict.fromkeys(
            ("Decisions", "Migrations", "Migrations Failed", "Bytes Moved", "VMs Under Pressure",
             "VM-Seconds Under Pressure", "HA Restarts", "HA Restarts Failed"),
            0,
        )  # fmt: skip
        self._counters = None if self.registry is None else self.registry.register(CLUSTER_SET)
        self._seconds = 0.0
        self._decided_at = 0.0
        self._ha_why: dict[str, tuple[str, str]] = {}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cluster-leader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        held = self._held
        if held is not None:
            try:
                election.resign(self.etcd, held)
            except EtcdError:
                pass

    def _publish(self) -> None:
        if self._counters is not None:
            leading = 1 if self._held is not None else 0
            self._counters.update(
                {**self.counts, "Leader": leading, "Decision Time": round(self._seconds, 6)}
            )

    def _run(self) -> None:
        while not self._stop.wait(min(self.every_s, HA_EVERY_S)):
            try:
                self._tick()
            except (EtcdError, RecordError, ValueError, ProvisionError) as e:
                log.warning("cluster balancer on %s: %s", self.host, e)
            except Exception:  # noqa: BLE001 - a user's policy may fail in any way
                log.exception("cluster balancer on %s failed", self.host)
            self._publish()

    def _tick(self) -> None:
        lease = self.lease()
        held = self._held
        if held is not None and (
            held.lease != lease or not election.still_leading(self.etcd, held)
        ):
            log.warning("host %s no longer leads the cluster balancer", self.host)
            self._held = held = None
        if held is None:
            if not lease:
                return
            held = election.campaign(self.etcd, self.host, lease)
            if held is None:
                return
            self._held = held
            log.info("host %s leads the cluster balancer (term %d)", self.host, held.term)
        self._restart_orphans(held)
        now = time.monotonic()
        if now - self._decided_at < self.every_s:
            return
        self._decided_at = now
        d = decide(self.etcd, self.policy, self.limits)
        self._seconds = d.seconds
        self.counts["Decisions"] += 1
        under = sum(
            1 for h in d.hosts for v in h.vms if v.demand is not None and v.demand > v.assigned
        )
        self.counts["VMs Under Pressure"] = under
        self.counts["VM-Seconds Under Pressure"] += under * self.every_s
        if not d.moves:
            return
        log.info("cluster balancer: %d moves: %s", len(d.moves),
                 ", ".join(f"{m.vm} {m.source}->{m.destination}" for m in d.moves))  # fmt: skip
        for o in execute(
            self.etcd, held, d.moves, {h.name: h for h in d.hosts}, self.tokens(),
            report=lambda o: log.info("cluster balancer: %s %s %s->%s in %.1f s %s", o.state,
                                      o.move.vm, o.move.source, o.move.destination, o.seconds,
                                      o.why),
            tls=self.tls,
        ):  # fmt: skip
            self.outcomes.append(o)
            if o.state == "done":
                self.counts["Migrations"] += 1
                self.counts["Bytes Moved"] += o.move.bytes
            elif o.state != "skipped":
                self.counts["Migrations Failed"] += 1

    def _restart_orphans(self, held: election.Leadership) -> None:
        hosts = read_hosts(self.etcd)
        if not ha.orphans(self.etcd, {h.name for h in hosts}):
            return
        for r in ha.restart_orphans(self.etcd, held, hosts, self.tokens(), tls=self.tls):
            # A VM that fits nowhere is tried again every HA_EVERY_S: logged when its reason changes.
            if self._ha_why.get(r.vm) != (r.state, r.why):
                self._ha_why[r.vm] = (r.state, r.why)
                log.warning("HA restart: %s %s (host %s's lease ended) on %s %s",
                            r.state, r.vm, r.source, r.host or "-", r.why)  # fmt: skip
            if r.state == "skipped":
                continue
            self._ha_why.pop(r.vm, None)
            self.restarts.append(r)
            if r.state == "restarted":
                self.counts["HA Restarts"] += 1
            elif r.state == "failed":
                self.counts["HA Restarts Failed"] += 1
