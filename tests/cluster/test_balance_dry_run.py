"""`pyhv cluster balance --cluster E --dry-run` against a real etcd: it campaigns for the
cluster balancer's leadership, reads the live hosts' records (as their VMMS publish them) and
prints the plan; while another host leads it plans nothing and says who leads."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pyhv.cluster import election
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import HostRecord, VmSummary, encode, host_key
from tests.cluster.cluster_hosts import pyhv
from tests.support.etcd import etcd_server

pytestmark = pytest.mark.unit

G = 1 << 30


def _vm(name: str, gib: float) -> VmSummary:
    size = int(gib * G)
    return VmSummary(name, assigned=size, startup=size, minimum=G // 2, maximum=8 * G, target=size)


def _balance(endpoint: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return pyhv("cluster", "balance", "--cluster", endpoint, *extra, timeout=60)


def test_the_leader_prints_the_plan_that_moves_a_vm_off_a_short_host(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        lease = etcd.grant(60)
        short = HostRecord("a", "127.0.0.1:1", "127.0.0.1", total=9 * G, free=0, reserve=G,
                           vms=[_vm("big", 5), _vm("small", 4)])  # fmt: skip
        roomy = HostRecord("b", "127.0.0.1:2", "127.0.0.1", total=9 * G, free=6 * G, reserve=G,
                           vms=[_vm("idle", 2)])  # fmt: skip
        for rec in (short, roomy):
            etcd.put(host_key(rec.name), encode(rec), lease=lease)
        etcd.put(host_key("bad"), '{"name": "bad"}', lease=lease)  # left out, with a warning
        r = pyhv("cluster", "hosts", "--cluster", server.endpoint, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "2 hosts; cluster balancer leader: none" in r.stdout
        assert any(line.split()[:2] == ["a", "127.0.0.1:1"] for line in r.stdout.splitlines())
        r = _balance(server.endpoint, "--dry-run")
        assert r.returncode == 0, r.stderr
        assert "host a: short by 1024 MiB" in r.stdout
        assert "move small: a -> b (4096 MiB to send, relieves 1024 MiB)" in r.stdout
        out = json.loads(r.stdout.splitlines()[-1])
        assert out["leader"] == "pyhv-cli" and out["moves"][0]["vm"] == "small"
        assert election.leader(etcd) is None  # it resigned after the dry run

        other = election.campaign(etcd, "b", lease)
        assert other is not None
        r = _balance(server.endpoint, "--dry-run")
        assert r.returncode == 1 and f"b (term {other.term}) leads the cluster balancer" in r.stderr
        r = _balance(server.endpoint, "--tokens", str(tmp_path / "none"))
        assert r.returncode == 1 and "cannot read the hosts' tokens file" in r.stderr
