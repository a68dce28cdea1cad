"""The cluster as the balancer's leader reads it from etcd: the live hosts' records and the
migrations in flight, turned into the columns of a pyhv.cluster.policy.ClusterSnapshot."""

from __future__ import annotations

import logging
import time

import numpy as np

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.policy import ClusterSnapshot
from pyhv.cluster.records import (
    HOSTS,
    MIGRATIONS,
    VMS,
    HostRecord,
    MigrationRecord,
    RecordError,
    decode,
)

log = logging.getLogger("pyhv.cluster")


def read_hosts(etcd: Etcd) -> list[HostRecord]:
    """Every live host's record (a host whose lease ended is not there), sorted by name. A
    record that does not decode is left out with a warning naming it: one bad host must not
    hide the others."""
    hosts = []
    for kv in etcd.get_prefix(HOSTS)[0]:
        try:
            hosts.append(decode(kv.key, kv.value, HostRecord))
        except RecordError as e:
            log.warning("%s: that host is left out", e)
    return hosts


def read_migrations(etcd: Etcd) -> list[MigrationRecord]:
    kvs, _ = etcd.get_prefix(MIGRATIONS)
    return [decode(kv.key, kv.value, MigrationRecord) for kv in kvs]


def read_owners(etcd: Etcd) -> dict[str, str]:
    """Each owned VM's owner host (the owner keys)."""
    kvs, _ = etcd.get_prefix(VMS)
    out = {}
    for kv in kvs:
        vm, _, leaf = kv.key[len(VMS) :].partition("/")
        if leaf == "owner":
            out[vm] = kv.value
    return out


def read_last_moved(etcd: Etcd) -> dict[str, float]:
    """When each VM's last move by the cluster balancer ended (wall-clock seconds)."""
    kvs, _ = etcd.get_prefix(VMS)
    out = {}
    for kv in kvs:
        vm, _, leaf = kv.key[len(VMS) :].partition("/")
        if leaf == "moved":
            try:
                out[vm] = float(kv.value)
            except ValueError:
                raise RecordError(f"etcd key {kv.key} holds {kv.value!r}, not a time") from None
    return out


def snapshot(
    hosts: list[HostRecord],
    migrations: list[MigrationRecord] = (),  # type: ignore[assignment]
    now: float | None = None,
    last_moved: dict[str, float] | None = None,
    owners: dict[str, str] | None = None,
) -> ClusterSnapshot:
    """The snapshot of `hosts` (capacity = total less reserve); a VM without a reported demand
    has its assigned memory as target.

    Host records are published every few seconds, so a VM that just moved can still be listed
    by its old host: where `owners` (VM -> host, the owner keys) names a host, the VM counts
    only there; a VM listed twice without an owner counts once, at the first host by name."""
    names = tuple(h.name for h in hosts)
    index = {n: i for i, n in enumerate(names)}
    owned = owners or {}
    seen: set[str] = set()
    vms = []
    for i, h in enumerate(hosts):
        for v in h.vms:
            if owned.get(v.name, h.name) != h.name or v.name in seen:
                continue
            seen.add(v.name)
            vms.append((i, v))
    vm_ids = tuple(v.name for _, v in vms)
    vm_index = {n: i for i, n in enumerate(vm_ids)}
    moving = [
        (vm_index[m.vm], index[m.destination])
        for m in migrations
        if m.vm in vm_index and m.destination in index
    ]
    moved = last_moved or {}
    return ClusterSnapshot(
        now=time.time() if now is None else now,
        hosts=names,
        capacity=np.array([max(0, h.total - h.reserve) for h in hosts], dtype=np.int64),
        vm_ids=vm_ids,
        vm_host=np.array([i for i, _ in vms], dtype=np.intp),
        assigned=np.array([v.assigned for _, v in vms], dtype=np.int64),
        target=np.array([v.target or v.assigned for _, v in vms], dtype=np.int64),
        minimum=np.array([v.minimum for _, v in vms], dtype=np.int64),
        dirty_bytes_per_s=np.array([float(v.dirty_bytes_per_s) for _, v in vms]),
        last_moved=np.array([moved.get(v.name, -np.inf) for _, v in vms], dtype=np.float64),
        moving=np.array([m[0] for m in moving], dtype=np.intp),
        moving_to=np.array([m[1] for m in moving], dtype=np.intp),
    )
