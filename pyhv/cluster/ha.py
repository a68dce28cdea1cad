"""HA restart: when a host's lease ends (its record is gone from /pyhv/hosts/), the cluster
balancer's leader cold-starts that host's highly available VMs (VmRecord.ha, desired
`running`) on other hosts, chosen by placement (pyhv.cluster.placement).

For each such VM, in order:
1. the leader checks it still leads, and places the VM on the live hosts (what each has free,
   less what this round already placed there);
2. ownership moves from the dead host to the chosen one by compare-and-swap against the owner
   revision read in step 1 (the fencing token): a VM whose owner changed meanwhile is left
   alone, so no two restarts of one VM can both win;
3. the chosen host's VMMS creates the VM (if it does not have it) and starts it; its start
   guard (pyhv.cluster.membership) checks that its host owns the VM, so the dead host, should it
   come back, cannot start it: it was fenced (its VMs stopped) before its lease could end;
4. the restart is appended to the VM's history.
A restart that fails at step 3 leaves the VM owned by the chosen host, off, with the reason in
its history (`pyhv vm show NAME --cluster`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from pyhv.cluster import election, history, ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.placement import HostSpace, NoPlacement, VmDemand, place
from pyhv.cluster.provision import HostTokens, ProvisionError, host_client, host_spaces
from pyhv.cluster.records import VMS, HostRecord, RecordError, VmRecord, decode
from pyhv.vmms.client import ClientError, ClientTls

log = logging.getLogger("pyhv.cluster")


@dataclass(frozen=True, slots=True)
class Orphan:
    """A highly available VM that should run, owned by a host that is no longer live."""

    record: VmRecord
    held: ownership.Ownership


@dataclass(frozen=True, slots=True)
class Restart:
    """What became of one orphan: `state` restarted, failed or skipped; `host` where it went."""

    vm: str
    source: str
    state: str
    host: str = ""
    why: str = ""
    token: int = 0


def orphans(etcd: Etcd, live: set[str]) -> list[Orphan]:
    """The HA VMs with desired state `running` whose owner is not among the `live` hosts."""
    kvs, _ = etcd.get_prefix(VMS)
    records: dict[str, VmRecord] = {}
    owners: dict[str, ownership.Ownership] = {}
    for kv in kvs:
        vm, _, leaf = kv.key[len(VMS) :].partition("/")
        if leaf == "config":
            try:
                records[vm] = decode(kv.key, kv.value, VmRecord)
            except RecordError as e:
                log.warning("HA restart: %s: that VM is left alone", e)
        elif leaf == "owner":
            owners[vm] = ownership.Ownership(vm, kv.value, kv.mod_revision)
    return [
        Orphan(rec, owners[vm])
        for vm, rec in sorted(records.items())
        if rec.ha and rec.desired == "running" and vm in owners and owners[vm].host not in live
    ]


def _demand(rec: VmRecord) -> VmDemand:
    c = rec.config
    startup = int(c.get("memory", 512 << 20))
    minimum = int(c.get("minimum", 256 << 20)) if c.get("dynamic_memory") else startup
    return VmDemand(rec.name, startup, minimum, tuple(rec.affinity), tuple(rec.anti_affinity))


def restart_orphans(
    etcd: Etcd,
    leader: election.Leadership,
    hosts: list[HostRecord],
    tokens: Mapping[str, HostTokens],
    report: Callable[[Restart], object] = lambda r: None,
    tls: ClientTls | None = None,
) -> list[Restart]:
    """Restart every orphan on a live host (the leader's HA step); what became of each."""
    lost = orphans(etcd, {h.name for h in hosts})
    if not lost:
        return []
    spaces = {s.name: s for s in host_spaces(etcd, hosts)}
    by_name = {h.name: h for h in hosts}
    out = []
    for o in lost:
        if not election.still_leading(etcd, leader):
            break
        r = restart_one(etcd, o, spaces, by_name, tokens, tls)
        report(r)
        out.append(r)
    return out


def restart_one(
    etcd: Etcd,
    o: Orphan,
    spaces: dict[str, HostSpace],
    hosts: Mapping[str, HostRecord],
    tokens: Mapping[str, HostTokens],
    tls: ClientTls | None,
) -> Restart:
    """Steps 2-4 for one orphan, on the hosts `spaces` (updated with what it took)."""
    vm, source = o.record.name, o.held.host
    demand = _demand(o.record)
    try:
        chosen = place(demand, list(spaces.values()))
        client = host_client(hosts[chosen.name], tokens, tls)
    except (NoPlacement, ProvisionError) as e:
        return Restart(vm, source, "skipped", why=str(e))
    try:
        held = ownership.move(etcd, o.held, chosen.name)
    except ownership.OwnershipConflict as e:
        return Restart(vm, source, "skipped", why=str(e))
    # What this round placed there is no longer free (the host publishes every 2 s).
    spaces[chosen.name] = replace(
        chosen,
        free=max(0, chosen.free - demand.startup),
        minimums=chosen.minimums + demand.minimum,
    )
    try:
        try:
            client.request("POST", "/api/vms", o.record.config)
        except ClientError as e:
            if e.status != 409:  # 409: the host has the VM already (it ran there before)
                raise
        client.request("POST", f"/api/vms/{vm}/start")
    except (ClientError, OSError) as e:
        why = f"host {chosen.name} did not start it: {e}"
        history.append(etcd, vm, "restarted", chosen.name, source=source, token=held.token,
                       why=why)  # fmt: skip
        return Restart(vm, source, "failed", chosen.name, why, held.token)
    history.append(etcd, vm, "restarted", chosen.name, source=source, token=held.token,
                   why=f"host {source}'s lease ended")  # fmt: skip
    return Restart(vm, source, "restarted", chosen.name, token=held.token)
