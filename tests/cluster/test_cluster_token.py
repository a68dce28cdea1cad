"""The cluster token (STATE/cluster-token), what hosts place VMs on each other with: a real
VMMS of a cluster accepts it for placement (`pyhv vm create --cluster` through
provision.host_client, whose tokens file holds it), for starting a VM and migrating one out, and
refuses it (403, saying what it may do) everywhere else: not delete, not stop, not the console,
not reading the host's VMs; and even on those routes only for VMs of the cluster that it gives
this host, migrated only to another live host of the cluster. (Starting with it runs a guest: test_start_fencing_guest.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from pyhv.vmms.client import ClientError
from tests.cluster.cluster_hosts import cluster_hosts, pyhv
from tests.support.etcd import etcd_server

pytestmark = pytest.mark.unit


def test_the_cluster_token_places_vms_and_nothing_else(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with cluster_hosts(tmp_path, etcd, {"a": "1G"}) as (hosts, tokens):
            a = hosts["a"]
            token_file = a.state / "cluster-token"
            assert token_file.stat().st_mode & 0o777 == 0o600
            cluster_token = token_file.read_text().strip()
            assert cluster_token not in (
                a.admin_token_file.read_text().strip(),
                a.token_file.read_text().strip(),
            )
            assert tokens.read_text().split()[1] == cluster_token
            r = pyhv(
                "vm", "create", "w", "--memory", "128M", "--static",
                "--cluster", server.endpoint, "--tokens", str(tokens),
            )  # fmt: skip
            assert r.returncode == 0 and "placed on host a" in r.stderr, r.stderr
            assert "w" in a.names()

            peer = a.tcp_client(token_file)
            refused = [
                ("GET", "/api/vms"),
                ("GET", "/api/vms/w"),
                ("DELETE", "/api/vms/w"),
                ("POST", "/api/vms/w/stop"),
                ("PATCH", "/api/vms/w"),
                ("POST", "/api/chart-codes"),
                ("POST", "/api/migrations/incoming"),
                ("GET", "/metrics"),
            ]
            for method, path in refused:
                with pytest.raises(ClientError) as e:
                    peer.request(method, path, {} if method in ("PATCH", "POST") else None)
                assert e.value.status == 403, (method, path, e.value)
                assert "the cluster token only places VMs here" in str(e.value)
            with pytest.raises(ClientError) as e:
                peer.console("w")
            assert e.value.status == 403, e.value
            # Migrating out is the leader's move: only to another live host of the cluster.
            for dest in ("127.0.0.1:1", a.address):
                with pytest.raises(ClientError) as e:
                    peer.request(
                        "POST", "/api/vms/w/migrate", {"destination": dest, "token": "t" * 32}
                    )
                assert e.value.status == 403, e.value
                assert f"destination {dest!r} is not the API of a live host" in str(e.value)
            with pytest.raises(ClientError) as e:
                peer.request("GET", "/api/migrations/nope")
            assert e.value.status == 404, e.value
            # Only VMs of the cluster that it gives this host: not the host's own VMs, not a
            # VM the cluster gives another host.
            a.vm("create", "own", "--memory", "128M", "--static")
            for method, path, body in (
                ("POST", "/api/vms/own/start", None),
                ("POST", "/api/vms", {"name": "x", "memory": 128 << 20}),
            ):
                with pytest.raises(ClientError) as e:
                    peer.request(method, path, body)
                assert e.value.status == 403, e.value
                assert "is not a VM of the cluster" in str(e.value)
            held = ownership.owner(etcd, "w")
            assert held is not None
            ownership.move(etcd, held, "b")
            with pytest.raises(ClientError) as e:
                peer.request("POST", "/api/vms/w/start")
            assert e.value.status == 403 and "is given to b, not to a" in str(e.value), e.value
            assert "w" in a.names()  # nothing the peer tried removed it
            a.tcp_client().request("DELETE", "/api/vms/w")  # the admin token still may
            assert "w" not in a.names()
