"""The standing cluster balancer: every host's VMMS (`--balance-every`) campaigns under its own
lease; exactly one leads, decides every second and carries its plan out by live migration, so a
running guest moves to the other host and answers its console there, counted under
`\\pyhv Cluster\\`; when the leader's host stops, the other host takes the leadership over."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pyhv.cluster import election, ownership
from pyhv.cluster.etcd import Etcd
from tests.cluster.cluster_hosts import cluster_hosts, pyhv
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MOVE_G_ONCE = """
from pyhv.cluster.policy import Move, Plan

name = "move-g-once"


def plan(s):
    if "g" not in s.vm_ids:
        return Plan()
    i = s.vm_ids.index("g")
    if s.last_moved[i] > float("-inf"):
        return Plan()  # moved once: stay
    src = int(s.vm_host[i])
    return Plan((Move("g", s.hosts[src], s.hosts[1 - src], int(s.assigned[i])),))
"""


def test_one_standing_leader_moves_a_guest_and_hands_over_when_its_host_stops(
    tmp_path: Path,
) -> None:
    policy = tmp_path / "move_g_once.py"
    policy.write_text(MOVE_G_ONCE)
    extra = ["--balance-every", "1", "--balance-policy", str(policy)]
    extra += ["--cluster-tokens", str(tmp_path / "tokens")]
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with cluster_hosts(tmp_path, etcd, {"a": "1G", "b": "2G"}, extra=extra) as (
            hosts,
            tokens,
        ):
            a, b = hosts["a"], hosts["b"]
            lead = wait_for(lambda: election.leader(etcd), 30, "a host leading")
            assert lead[0] in hosts
            r = pyhv("vm", "create", "g", "--memory", "128M", "--cluster", server.endpoint,
                     "--tokens", str(tokens))  # fmt: skip
            assert r.returncode == 0 and "placed on host b" in r.stderr, r.stderr
            b.vm("start", "g")
            before = b.ticks("g")

            def owned_by_a() -> bool:
                o = ownership.owner(etcd, "g")
                return o is not None and o.host == "a"

            wait_for(owned_by_a, 90, "the standing leader moving g to host a")
            assert a.state_of("g") == "running" and a.ticks("g") > before
            leader = hosts[lead[0]]
            metrics = leader.client.request("GET", "/metrics")
            assert re.search(r"^pyhv_cluster_migrations(_total)? 1\.0$", metrics, re.M), metrics
            assert re.search(r"^pyhv_cluster_leader 1\.0$", metrics, re.M)
            other = "b" if lead[0] == "a" else "a"
            if lead[0] == "a":
                a.vm("stop", "g")  # the leader's host stops with nothing running
            leader.close()
            wait_for(
                lambda: (now := election.leader(etcd)) is not None and now[0] == other,
                30,
                f"host {other} taking the leadership over",
            )
