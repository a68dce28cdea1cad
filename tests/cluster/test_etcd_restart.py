"""etcd restarted under a running cluster loses nothing: a host whose etcd stops answering (paused
until a renewal failed) and then restarts within the host's lease keeps its lease and record
without fencing, and the VMs' records and owner keys (with their fencing tokens) are all there
afterwards."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import HostRecord, decode, host_key, vm_config_key
from tests.cluster.cluster_hosts import cluster_hosts, pyhv
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for

pytestmark = pytest.mark.unit


def test_etcd_restarted_under_running_hosts_loses_nothing(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with cluster_hosts(tmp_path, etcd, {"a": "1G"}, lease_ttl=10) as (hosts, tokens):
            r = pyhv("vm", "create", "v", "--cluster", server.endpoint, "--tokens", str(tokens))
            assert r.returncode == 0, r.stderr
            before = etcd.get(host_key("a"))
            owner = ownership.owner(etcd, "v")
            config = etcd.get(vm_config_key("v"))
            assert before is not None and owner is not None and config is not None
            log = Path(hosts["a"].log.name)
            server.pause()
            wait_for(lambda: "lease not renewed" in log.read_text(), 10, "a renewal failing")
            server.restart()

            def republished() -> HostRecord | None:
                kv = etcd.get(host_key("a"))
                rec = None if kv is None else decode(kv.key, kv.value, HostRecord)
                old = decode(before.key, before.value, HostRecord)
                return rec if rec is not None and rec.published > old.published else None

            wait_for(republished, 30, "host a publishing again after etcd's restart")
            after = etcd.get(host_key("a"))
            assert after is not None and after.lease == before.lease  # the same lease: no rejoin
            assert ownership.owner(etcd, "v") == owner
            assert etcd.get(vm_config_key("v")) == config
            assert "v" in hosts["a"].names()
            text = log.read_text()
            assert "fenced" not in text and "joining again" not in text, text[-2000:]
