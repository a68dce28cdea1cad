"""HA restart end to end: two real VMMS hosts on one real etcd; a highly available guest runs
on one; every process of that host (the VMMS and its workers) is killed at once; when its lease
ends the leader starts the guest on the other host, with ownership moved by compare-and-swap
(a newer fencing token), and its console answers there within the lease TTL + 3 s of the kill.
`pyhv vm list --cluster` and `pyhv vm show --cluster` say where it runs and that it was
restarted; none of the dead host's processes is left (the VM runs once)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from tests.cluster.cluster_hosts import ha_restart, pyhv
from tests.support.etcd import etcd_server

pytestmark = pytest.mark.guest

TTL_S = 5


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie runs nothing (its parent, pytest, reaps it later)


def test_a_dead_hosts_ha_guest_restarts_on_another_host(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with ha_restart(tmp_path, etcd, ("a", "b"), TTL_S) as (hosts, r):
            assert r.destination != r.source
            # The VMMS and the guest's worker (at least) were killed, and none survives.
            assert len(r.killed) >= 2, r.killed
            assert not [p for p in r.killed if _alive(p)]
            print(f"HA restart: kill -> first serial byte on {r.destination}: {r.seconds} s")
            assert r.seconds <= TTL_S + 3, r.seconds
            dest = hosts[r.destination]
            assert dest.ticks("g") >= 0  # its console answers commands there
            now = ownership.owner(etcd, "g")
            assert now is not None and now.host == r.destination and now.token > r.token_before
            out = pyhv("vm", "list", "--cluster", server.endpoint)
            assert out.returncode == 0, out.stderr
            row = next(line for line in out.stdout.splitlines() if line.startswith("g "))
            assert r.destination in row and "running" in row and "yes" in row, out.stdout
            out = pyhv("vm", "show", "g", "--cluster", server.endpoint, "--json")
            assert out.returncode == 0, out.stderr
            shown = json.loads(out.stdout)
            kinds = [(e["kind"], e["host"], e["source"]) for e in shown["history"]]
            assert kinds == [("placed", r.source, ""), ("restarted", r.destination, r.source)]
            assert shown["desired"] == "running" and shown["ha"] is True
            # The leader's counters say so.
            metrics = dest.client.request("GET", "/metrics")
            assert "pyhv_cluster_ha_restarts" in metrics
            dest.vm("stop", "g")
            assert (
                json.loads(pyhv("vm", "show", "g", "--cluster", server.endpoint, "--json").stdout)[
                    "desired"
                ]
                == "off"
            )
