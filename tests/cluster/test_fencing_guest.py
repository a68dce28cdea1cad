"""Fencing with a real guest: a host whose etcd stops answering (etcd paused with SIGSTOP under
a running VMMS) stops its VMs before its lease can expire, so another host could start them
without the VM ever running twice; once etcd answers again the host joins with a new lease and
the fenced VM stays off."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import HostRecord, decode, host_key
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for
from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest

TTL_S = 5


def test_a_host_cut_off_from_etcd_stops_its_vms_before_its_lease_expires(
    tmp_path: Path,
) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        host = VmmsProcess(
            tmp_path,
            "a",
            "1G",
            extra=("--cluster", server.endpoint, "--host", "a", "--lease-ttl", str(TTL_S)),
        )
        try:
            host.vm("create", "g", "--memory", "128M", "--dynamic", "--maximum", "256M")
            host.vm("start", "g")
            assert "ticks" in host.shell("g", "ticks", b"ticks: ")  # the guest answers

            def published_with_g() -> HostRecord | None:
                kv = etcd.get(host_key("a"))
                rec = None if kv is None else decode(kv.key, kv.value, HostRecord)
                if rec is None or [v.name for v in rec.vms] != ["g"]:
                    return None
                return rec if rec.vms[0].demand is not None else None

            # The guest's DM driver reported: its demand and the host balancer's target are out.
            rec = wait_for(published_with_g, 60, "host a publishing VM g with its demand")
            g = rec.vms[0]
            assert g.minimum <= g.target <= g.maximum == 256 << 20 and g.demand
            assert g.target >= g.demand and rec.free < rec.total - rec.reserve
            lease = etcd.get(host_key("a"))
            assert lease is not None
            server.pause()
            paused_at = time.monotonic()
            try:
                # The deadline is the lease itself: the VM must be off before the TTL runs out.
                wait_for(lambda: host.state_of("g") == "off", TTL_S, "VM g stopped by fencing")
                off_after = time.monotonic() - paused_at
            finally:
                server.resume()
            # The agent logs its fencing once every stop has returned (just after the VM is off).
            fenced = r"fenced: 1 VMs stopped (-?[\d.]+) s before the lease could expire"
            m = wait_for(
                lambda: re.search(fenced, Path(host.log.name).read_text()), 10, "the fencing logged"
            )
            assert float(m[1]) > 0, m[0]
            assert off_after < TTL_S
            metrics = host.client.request("GET", "/metrics")
            assert re.search(r"^pyhv_cluster_host_fencings(_total)? 1\.0$", metrics, re.M), metrics
            assert re.search(r"^pyhv_cluster_host_vms_fenced(_total)? 1\.0$", metrics, re.M)
            assert re.search(
                r"^pyhv_cluster_host_lease_renewals_failed(_total)? [1-9]", metrics, re.M
            )

            # Back in the cluster under a new lease; the fenced VM is not started again.
            def rejoined() -> bool:
                kv = etcd.get(host_key("a"))
                return kv is not None and kv.lease != lease.lease

            wait_for(rejoined, 30, "host a joining again with a new lease")
            assert host.state_of("g") == "off"
        finally:
            host.close()
