"""Carrying out the cluster balancer's plan: each move is a live migration between two hosts'
VMMS (the existing `POST /api/vms/{name}/migrate` machinery), run by the elected leader.

For each move, in order:
1. the leader checks it still leads (its term) and reads the VM's owner: the VM must be owned by
   the move's source, and its owner revision is the fencing token the move is made under;
2. it records the migration in flight (/pyhv/migrations/<vm>, create-only, under the leader's
   lease: a leader that dies takes its records with it);
3. it asks the source's VMMS to migrate the VM to the destination's VMMS (reached by
   pyhv.cluster.provision.host_client) and waits for the migration's end;
4. when the VM runs at the destination, ownership moves to it by compare-and-swap against the
   token of step 1 (a stale token means someone else moved it: reported, never overwritten),
   and the time of the move is recorded (the policy's minimum interval per VM counts from it);
5. the migration record is removed.
A move that fails leaves the VM where it was (the migration aborts at the source) and is
reported with the source VMMS's reason; the next moves still run.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pyhv.cluster import election, history, ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.policy import Move
from pyhv.cluster.provision import HostTokens, ProvisionError, host_client
from pyhv.cluster.records import (
    HostRecord,
    MigrationRecord,
    encode,
    migration_key,
    vm_moved_key,
)
from pyhv.vmms.client import ClientError, ClientTls

#: The migration states after which a VMMS's record no longer changes.
ENDED = ("done", "failed", "in-doubt")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one move: `state` done, failed, skipped or in-doubt; `why` the reason."""

    move: Move
    state: str
    why: str = ""
    seconds: float = 0.0
    token: int = 0  # the new ownership token when done


def execute(
    etcd: Etcd,
    leader: election.Leadership,
    moves: Sequence[Move],
    hosts: Mapping[str, HostRecord],
    tokens: Mapping[str, HostTokens],
    *,
    timeout_s: float = 300.0,
    report: Callable[[Outcome], object] = lambda o: None,
    tls: ClientTls | None = None,
) -> list[Outcome]:
    out = []
    for m in moves:
        outcome = _one(etcd, leader, m, hosts, tokens, timeout_s, tls)
        report(outcome)
        out.append(outcome)
        if outcome.why == "no longer the leader":
            break
    return out


def _one(
    etcd: Etcd,
    leader: election.Leadership,
    m: Move,
    hosts: Mapping[str, HostRecord],
    tokens: Mapping[str, HostTokens],
    timeout_s: float,
    tls: ClientTls | None = None,
) -> Outcome:
    started = time.monotonic()

    def ended(state: str, why: str = "", token: int = 0) -> Outcome:
        return Outcome(m, state, why, round(time.monotonic() - started, 2), token)

    if not election.still_leading(etcd, leader):
        return ended("skipped", "no longer the leader")
    held = ownership.owner(etcd, m.vm)
    if held is None or held.host != m.source:
        return ended(
            "skipped", f"owned by {held.host if held else 'nobody'}, not by the source {m.source}"
        )
    if m.source not in hosts or m.destination not in hosts:
        return ended("skipped", "the source or the destination left the cluster")
    try:
        source = host_client(hosts[m.source], tokens, tls)
        dest = tokens.get(m.destination)
        if dest is None:
            raise ProvisionError(f"no token for host {m.destination} in the tokens file")
        # The destination's migration token (it can only bring a VM in), else the token given.
        dest_token = dest.migration or dest.api
    except ProvisionError as e:
        return ended("skipped", str(e))
    record = MigrationRecord(m.vm, m.source, m.destination, m.bytes, time.time(), held.token)
    key = migration_key(m.vm)
    if not etcd.swap(key, encode(record), 0, lease=leader.lease).succeeded:
        return ended("skipped", "a migration of this VM is in flight")
    try:
        try:
            rec = source.request(
                "POST",
                f"/api/vms/{m.vm}/migrate",
                {"destination": hosts[m.destination].api, "token": dest_token},
            )
            deadline = time.monotonic() + timeout_s
            while rec["state"] not in ENDED:
                if time.monotonic() > deadline:
                    return ended("in-doubt", f"not ended after {timeout_s:.0f} s ({rec['state']})")
                time.sleep(0.2)
                rec = source.request("GET", f"/api/migrations/{rec['id']}")
        except (ClientError, OSError) as e:
            return ended("failed", f"source {m.source}: {e}")
        if rec["state"] != "done":
            return ended(rec["state"], rec.get("error") or "")
        try:
            moved = ownership.move(etcd, held, m.destination)
        except ownership.OwnershipConflict as e:
            return ended("in-doubt", f"migrated, but ownership did not move: {e}")
        etcd.put(vm_moved_key(m.vm), repr(time.time()))  # the minimum interval counts from here
        history.append(etcd, m.vm, "moved", m.destination, source=m.source, token=moved.token)
        return ended("done", token=moved.token)
    finally:
        etcd.delete(key)
