"""`pyhv vm create NAME --cluster ENDPOINTS` against a real etcd and two real VMMS hosts: the
VM is placed on the host with most free memory, recorded and owned in etcd and created on that
host; anti-affinity keeps two VMs of a group apart; a VM that fits nowhere is told what is short
where, and nothing of it is left behind."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import VmRecord, decode, vm_config_key
from tests.cluster.cluster_hosts import cluster_hosts, pyhv
from tests.support.etcd import etcd_server

pytestmark = pytest.mark.unit


def test_vm_create_places_on_the_host_with_room_and_keeps_groups_apart(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with cluster_hosts(tmp_path, etcd, {"a": "1G", "b": "2G"}) as (hosts, tokens):

            def create(*args: str) -> subprocess.CompletedProcess[str]:
                return pyhv(
                    "vm", "create", *args, "--cluster", server.endpoint, "--tokens", str(tokens)
                )

            r = create("web1", "--memory", "256M", "--anti-affinity", "web")
            assert r.returncode == 0 and "placed on host b" in r.stderr, r.stderr
            assert "web1" in hosts["b"].names() and "web1" not in hosts["a"].names()
            held = ownership.owner(etcd, "web1")
            assert held is not None and held.host == "b"
            kv = etcd.get(vm_config_key("web1"))
            assert kv is not None
            assert decode(kv.key, kv.value, VmRecord).anti_affinity == ["web"]
            # b has the most free memory, but web1 is there: web2 goes to a.
            r = create("web2", "--memory", "256M", "--anti-affinity", "web")
            assert r.returncode == 0 and "placed on host a" in r.stderr, r.stderr
            r = create("web3", "--memory", "256M", "--anti-affinity", "web")
            assert r.returncode == 1
            assert "a: anti-affinity group 'web' has web2 here" in r.stderr
            assert "b: anti-affinity group 'web' has web1 here" in r.stderr
            r = create("huge", "--memory", "4G", "--static")
            assert r.returncode == 1 and "VM 'huge'" in r.stderr and "fits nowhere" in r.stderr
            assert "b: 1792 MiB free above the reserve, 4096 MiB startup wanted" in r.stderr
            assert etcd.get(vm_config_key("huge")) is None and ownership.owner(etcd, "huge") is None
            r = create("web1", "--memory", "256M")
            assert r.returncode == 1 and "the cluster has a VM named 'web1'" in r.stderr
            tokens.chmod(0o644)
            r = create("web4", "--memory", "256M")
            assert (
                r.returncode == 1 and f"open to others (mode 644): chmod 600 {tokens}" in r.stderr
            )
