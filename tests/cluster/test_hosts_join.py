"""Hosts join the cluster: `pyhv vmms serve --cluster ENDPOINTS --host NAME` against a real etcd
registers the host under a lease with its pool's capacity, keeps it published, refuses a name a
live host holds, and withdraws the host when the VMMS stops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import HostRecord, decode, host_key
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for
from tests.vmms.vmms_process import ROOT, VmmsProcess

pytestmark = pytest.mark.unit


def _serve(state: Path, endpoint: str, host: str = "a") -> subprocess.CompletedProcess[str]:
    """A `pyhv vmms serve` as `host` that is expected to fail to join."""
    return subprocess.run(
        [sys.executable, "-m", "pyhv.cli", "vmms", "serve", "--state-dir", str(state)]
        + ["--memory-budget", "1G", "--no-jail", "--cluster", endpoint, "--host", host],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def _record(etcd: Etcd, host: str) -> HostRecord | None:
    kv = etcd.get(host_key(host))
    return None if kv is None else decode(kv.key, kv.value, HostRecord)


def test_a_host_joins_with_its_capacity_and_leaves_on_shutdown(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        host = VmmsProcess(tmp_path, "a", "1G", extra=("--cluster", server.endpoint, "--host", "a"))
        try:
            rec = wait_for(lambda: _record(etcd, "a"), 30, "host a's record in etcd")
            assert rec.total == 1 << 30 and rec.reserve == 256 << 20
            assert rec.free == (1 << 30) - (256 << 20)
            assert rec.api == host.address and rec.vms == []
            kv = etcd.get(host_key("a"))
            assert kv is not None and kv.lease != 0  # it lives under the host's lease
            first = rec.published
            wait_for(
                lambda: (r := _record(etcd, "a")) is not None and r.published > first,
                30,
                "host a publishing its capacity again",
            )
            # A second VMMS calling itself "a" is refused while a is alive.
            r = _serve(tmp_path / "b", server.endpoint)
            assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
            assert "host name 'a' is held by a live host" in r.stderr, r.stderr
        finally:
            host.close()
        assert host.proc.returncode == 0
        # Withdrawn at once (its lease revoked), not after the TTL.
        assert _record(etcd, "a") is None


def test_an_unreachable_cluster_is_a_clear_error(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server:
        endpoint = server.endpoint
    r = _serve(tmp_path / "s", endpoint)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot join the cluster" in r.stderr and "check that etcd runs" in r.stderr
    r = _serve(tmp_path / "s", endpoint, host="no spaces")
    assert r.returncode == 1 and "host name 'no spaces': use 1-63 letters" in r.stderr, r.stderr
