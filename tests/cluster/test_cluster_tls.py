"""Mutual TLS between hosts: `pyhv cluster init` makes a cluster CA, `pyhv cluster add-host`
each host's certificate; hosts served with them publish their certificate's fingerprint, and
the cluster reaches them over mutual TLS (`pyhv vm create --cluster` with a certificate the
cluster CA signed). A client whose certificate comes from another CA is refused by the hosts,
and a host whose certificate comes from another CA is refused by the cluster's clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.pki import fingerprint
from pyhv.cluster.records import vm_config_key
from pyhv.cluster.snapshot import read_hosts
from tests.cluster.cluster_hosts import cluster_hosts, pyhv
from tests.support.etcd import etcd_server

pytestmark = pytest.mark.unit


def _tls(ca: Path, cert_dir: Path, name: str) -> dict[str, str]:
    return {
        "PYHV_TLS_CA": str(ca / "ca.pem"),
        "PYHV_TLS_CERT": str(cert_dir / f"{name}.pem"),
        "PYHV_TLS_KEY": str(cert_dir / f"{name}.key"),
    }


def test_hosts_speak_mutual_tls_and_refuse_another_cas_certificates(tmp_path: Path) -> None:
    ca, other = tmp_path / "ca", tmp_path / "other-ca"
    for args in (("init", str(ca)), ("init", str(other))):
        r = pyhv("cluster", *args)
        assert r.returncode == 0 and "cluster CA" in r.stdout, r.stderr
    assert (ca / "ca.key").stat().st_mode & 0o077 == 0
    for name, where in (("a", ca), ("b", ca), ("admin", ca), ("c", other), ("rogue", other)):
        r = pyhv("cluster", "add-host", name, "--ca", str(where))
        assert r.returncode == 0 and "SHA-256" in r.stdout, r.stderr
    r = pyhv("cluster", "add-host", "a", "--ca", str(ca))
    assert r.returncode == 1 and "has a certificate already" in r.stderr
    r = pyhv("cluster", "init", str(ca))
    assert r.returncode == 1 and "holds a cluster CA already" in r.stderr

    def certs(name: str) -> list[str]:
        where = other if name == "c" else ca
        return ["--tls-cert", str(where / f"{name}.pem"), "--tls-key", str(where / f"{name}.key"),
                "--tls-client-ca", str(where / "ca.pem")]  # fmt: skip

    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with cluster_hosts(tmp_path, etcd, {"a": "1G", "b": "2G"}, per_host=certs) as (_, tokens):
            published = {h.name: h.fingerprint for h in read_hosts(etcd)}
            assert published == {"a": fingerprint(ca / "a.pem"), "b": fingerprint(ca / "b.pem")}
            create = ["--memory", "128M", "--cluster", server.endpoint, "--tokens", str(tokens)]
            # Without a certificate the cluster's client says what to give.
            r = pyhv("vm", "create", "g", *create)
            assert r.returncode == 1 and "serves mutual TLS" in r.stderr, r.stderr
            # A client certificate from another CA: the host refuses it at the handshake.
            r = pyhv("vm", "create", "g", *create, env=_tls(ca, other, "rogue"))
            assert r.returncode == 1 and "did not create VM 'g'" in r.stderr, r.stderr
            assert etcd.get(vm_config_key("g")) is None  # taken back
            # The cluster's own certificate: placed and created over mutual TLS.
            r = pyhv("vm", "create", "g", *create, env=_tls(ca, ca, "admin"))
            assert r.returncode == 0 and "placed on host b" in r.stderr, r.stderr
        # A host with a certificate from another CA joins etcd, but the cluster's clients
        # refuse to talk to it: its certificate does not chain to the cluster CA.
        (tmp_path / "rogue").mkdir()
        with cluster_hosts(tmp_path / "rogue", etcd, {"c": "3G"}, per_host=certs) as (_, tokens):
            r = pyhv("vm", "create", "h", "--memory", "128M", "--cluster", server.endpoint,
                     "--tokens", str(tokens), env=_tls(ca, ca, "admin"))  # fmt: skip
            assert r.returncode == 1 and "certificate verify failed" in r.stderr, r.stderr
