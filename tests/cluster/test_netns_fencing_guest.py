"""Hosts as network namespaces on a bridge (tests/support/netns.py), etcd listening on the
bridge, the hosts speaking mutual TLS with certificates from `pyhv cluster add-host`: a host
whose link is set down (cut off from etcd and from the other hosts) fences itself, stopping its
highly available guest before its lease can end; only then does the leader start the guest on
the other host (with a newer owner token), so it never runs on both. While cut off the host
starts nothing (it holds no lease); when the link comes back it joins again and still cannot
start the guest: the cluster gives it to the other."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import HostRecord, decode, host_key
from tests.cluster.cluster_hosts import cluster_hosts, publishes, pyhv
from tests.support.etcd import etcd_server
from tests.support.netns import netns_lab
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

TTL_S = 5


def test_a_host_cut_off_fences_itself_before_its_ha_guest_restarts_elsewhere(
    tmp_path: Path,
) -> None:
    ca = tmp_path / "ca"
    assert pyhv("cluster", "init", str(ca)).returncode == 0
    with netns_lab() as lab:
        for name in ("a", "b"):
            host = lab.add_host(name)
            r = pyhv("cluster", "add-host", name, "--ca", str(ca), "--address", host.address)
            assert r.returncode == 0, r.stderr
        assert pyhv("cluster", "add-host", "admin", "--ca", str(ca)).returncode == 0
        tls = {"PYHV_TLS_CA": str(ca / "ca.pem"), "PYHV_TLS_CERT": str(ca / "admin.pem"),
               "PYHV_TLS_KEY": str(ca / "admin.key")}  # fmt: skip

        def certs(name: str) -> list[str]:
            return ["--tls-cert", str(ca / f"{name}.pem"), "--tls-key", str(ca / f"{name}.key"),
                    "--tls-client-ca", str(ca / "ca.pem")]  # fmt: skip

        tokens = tmp_path / "tokens"
        extra = ("--balance-every", "300", "--balance-policy", "host-only",
                 "--cluster-tokens", str(tokens))  # fmt: skip
        with etcd_server(tmp_path, lab.address) as server, Etcd(server.endpoint) as etcd:
            with cluster_hosts(
                tmp_path, etcd, {"a": "2G", "b": "1G"}, TTL_S, extra, per_host=certs,
                wrap=lab.wrap, tcp=lambda name: f"{lab.hosts[name].address}:0",
            ) as (hosts, _):  # fmt: skip
                a, b = hosts["a"], hosts["b"]
                assert {decode(kv.key, kv.value, HostRecord).api.split(":")[0]
                        for kv in etcd.get_prefix("/pyhv/hosts/")[0]} == {
                    lab.hosts["a"].address, lab.hosts["b"].address}  # fmt: skip
                r = pyhv("vm", "create", "g", "--memory", "128M", "--ha", "--cluster",
                         server.endpoint, "--tokens", str(tokens), env=tls)  # fmt: skip
                assert r.returncode == 0 and "placed on host a" in r.stderr, r.stderr
                a.vm("start", "g")
                assert "ticks" in a.shell("g", "ticks", b"ticks: ")
                held = ownership.owner(etcd, "g")
                assert held is not None and held.host == "a"
                wait_for(lambda: publishes(etcd, "a", "g"), 30, "host a publishing g")
                lease = etcd.get(host_key("a"))
                assert lease is not None
                lab.cut("a")
                cut_at = time.monotonic()
                a_off_at = None
                # Both hosts watched (over their Unix sockets) until g runs on b: never on both.
                while True:
                    on_a = a.state_of("g")
                    on_b = b.state_of("g") if "g" in b.names() else "absent"
                    assert not (on_a == "running" and on_b == "running"), "g ran on both hosts"
                    if on_a != "running" and a_off_at is None:
                        a_off_at = time.monotonic() - cut_at
                    if on_b == "running":
                        b_on_at = time.monotonic() - cut_at
                        break
                    assert time.monotonic() - cut_at < TTL_S + 60, (on_a, on_b)
                    time.sleep(0.05)
                assert a_off_at is not None and a_off_at < TTL_S < b_on_at, (a_off_at, b_on_at)
                fenced = r"fenced: 1 VMs stopped (-?[\d.]+) s before the lease could expire"
                m = wait_for(lambda: re.search(fenced, Path(a.log.name).read_text()), 10,
                             "a's fencing logged")  # fmt: skip
                assert float(m[1]) > 0, m[0]
                print(f"link cut: g off on a after {a_off_at:.2f} s ({m[1]} s before the lease "
                      f"could end), running on b after {b_on_at:.2f} s")  # fmt: skip
                now = ownership.owner(etcd, "g")
                assert now is not None and now.host == "b" and now.token > held.token
                assert "ticks" in b.shell("g", "ticks", b"ticks: ")  # it answers on b
                # Cut off, with no lease, host a starts nothing.
                out = a.vm("start", "g", check=False)
                assert "holds no lease in the cluster" in out, out
                lab.restore("a")

                def rejoined() -> bool:
                    kv = etcd.get(host_key("a"))
                    return kv is not None and kv.lease != lease.lease

                wait_for(rejoined, 30, "host a back in the cluster under a new lease")
                out = a.vm("start", "g", check=False)
                assert "the cluster gives it to b" in out, out
                assert a.state_of("g") == "off" and b.state_of("g") == "running"
                b.vm("stop", "g")
