"""The cluster balancer carries its plan out: the elected leader live-migrates a running guest
between two real VMMS hosts of a real etcd cluster (the existing migration machinery), moves
the VM's ownership by compare-and-swap to the destination with a newer fencing token, records
when it moved, and the guest keeps running (its console answers at the destination). The same
move asked again at once is refused by the minimum interval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import migration_key, vm_moved_key
from tests.cluster.cluster_hosts import cluster_hosts, publishes, pyhv
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MOVE_G = """
from pyhv.cluster.policy import Move, Plan

name = "move-g"


def plan(s):
    i = s.vm_ids.index("g")
    src = int(s.vm_host[i])
    return Plan((Move("g", s.hosts[src], s.hosts[1 - src], int(s.assigned[i])),))
"""


def test_the_leader_live_migrates_a_guest_and_moves_its_ownership(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with cluster_hosts(tmp_path, etcd, {"a": "1G", "b": "2G"}) as (hosts, tokens):
            a, b = hosts["a"], hosts["b"]
            cluster = ["--cluster", server.endpoint, "--tokens", str(tokens)]
            r = pyhv("vm", "create", "g", "--memory", "128M", *cluster)
            assert r.returncode == 0 and "placed on host b" in r.stderr, r.stderr
            b.vm("start", "g")
            before = b.ticks("g")
            held = ownership.owner(etcd, "g")
            assert held is not None and held.host == "b"
            wait_for(lambda: publishes(etcd, "b", "g"), 30, "host b publishing its running VM g")
            policy = tmp_path / "move_g.py"
            policy.write_text(MOVE_G)
            r = pyhv("cluster", "balance", "--policy", str(policy), *cluster)
            assert r.returncode == 0, r.stdout + r.stderr
            assert "move g: b -> a" in r.stdout and "done g: b -> a" in r.stdout
            out = json.loads(r.stdout.splitlines()[-1])
            assert out["outcomes"] == [{"vm": "g", "state": "done", "why": ""}]
            # The guest runs on at the destination and its console answers there.
            assert a.state_of("g") == "running"
            assert a.ticks("g") > before
            moved = ownership.owner(etcd, "g")
            assert moved is not None and moved.host == "a" and moved.token > held.token
            assert etcd.get(migration_key("g")) is None and etcd.get(vm_moved_key("g")) is not None
            # b's stale token can no longer move it.
            with pytest.raises(ownership.OwnershipConflict):
                ownership.move(etcd, held, "b")
            wait_for(lambda: publishes(etcd, "a", "g"), 30, "host a publishing the VM it received")
            r = pyhv("cluster", "balance", "--policy", str(policy), *cluster)
            assert r.returncode == 1 and "after its last move" in r.stderr, r.stdout + r.stderr
            assert a.state_of("g") == "running"
            a.vm("stop", "g")
