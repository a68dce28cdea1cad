"""`pyhv experiment cluster` end to end (what `make cluster-demo` runs): three namespace hosts,
six HA guests; the short host is relieved by a live migration, then killed, and its guests
answer on the others; the timeline, the CSV and the PNG are written and the last line is the
issue's JSON summary with no VM ever running on two hosts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cluster.cluster_hosts import pyhv

pytestmark = pytest.mark.guest


def test_the_cluster_experiment_moves_a_vm_then_restarts_a_dead_hosts_vms(
    tmp_path: Path,
) -> None:
    r = pyhv("experiment", "cluster", "--out", str(tmp_path / "run"), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["hosts"] == 3 and summary["migrations"] >= 1, summary
    assert summary["vms_running_twice"] == 0
    assert 0 < summary["ha_restart_s"] <= 5 + 3 + 2, summary  # TTL + 3 s, and the polling
    assert summary["vm_seconds_under_pressure"] >= 0
    for step in ("is short", "cluster balancer moved", "killed", "restarted on host"):
        assert step in r.stdout, r.stdout
    csv = (tmp_path / "run.csv").read_text().splitlines()
    assert csv[0] == "t,host,vm,assigned_mib,demand_mib,memory_mib,short" and len(csv) > 50
    assert (tmp_path / "run.png").read_bytes()[:4] == b"\x89PNG"
