"""The fleet simulator runs the same placement, host balancer and cluster policies on a
simulated fleet and compares policies side by side: cluster balancing moves VMs off short hosts
and cuts the time VMs spend under pressure against Hyper-V's rules per host alone; a user's
policy runs through the documented interface; a CSV trace drives real VMs' memory."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from pyhv.cluster.policies import load_policy
from pyhv.cluster.simulator import SimConfig, simulate_many
from pyhv.cluster.workloads import synthetic
from tests.cluster.cluster_hosts import pyhv

pytestmark = pytest.mark.simulation


USER_POLICY = '''
"""Move the largest VM off the host with the largest deficit, to the host with the most room."""
from pyhv.cluster.policy import Move, Plan

name = "largest-first"


def plan(s):
    d = s.deficit()
    h = int(d.argmax())
    if d[h] <= 0:
        return Plan()
    on = (s.vm_host == h).nonzero()[0]
    recent = s.now - s.last_moved[on] < 900
    if recent.all():
        return Plan()
    v = int(on[(s.assigned[on] * ~recent).argmax()])
    dest = int(d.argmin())
    return Plan((Move(s.vm_ids[v], s.hosts[h], s.hosts[dest], int(s.assigned[v])),))
'''


def _simulate(*args: str) -> subprocess.CompletedProcess[str]:
    return pyhv("cluster", "simulate", *args)


def test_cluster_balancing_cuts_pressure_against_host_only_rules(tmp_path: Path) -> None:
    policy = tmp_path / "largest.py"
    policy.write_text(USER_POLICY)
    out = tmp_path / "sim"
    r = _simulate(
        "--hosts", "8", "--vms", "400", "--hours", "24", "--seed", "1", "--out", str(out),
        "--policy", "host-only", "--policy", "cluster", "--policy", str(policy),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    results = {x["policy"]: x for x in json.loads(r.stdout.splitlines()[-1])["results"]}
    assert set(results) == {"host-only", "cluster", "largest-first"}
    host, cluster = results["host-only"], results["cluster"]
    assert host["migrations"] == 0 and cluster["migrations"] > 0 and cluster["gib_moved"] > 0
    assert cluster["vm_seconds_under_pressure"] < host["vm_seconds_under_pressure"]
    assert host["saved_percent"] > 30  # Dynamic Memory against every VM at its maximum
    assert results["largest-first"]["migrations"] > 0
    assert "VM-s under pressure" in r.stdout and "migrations/h" in r.stdout
    with open(out.with_suffix(".csv")) as f:
        rows = list(csv.DictReader(f))
    assert [row["policy"] for row in rows] == ["host-only", "cluster", "largest-first"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_same_seed_gives_the_same_fleet_and_results() -> None:
    def once() -> list[dict[str, object]]:
        fleet = synthetic(120, seed=7, hours=4)
        results = simulate_many(fleet, [load_policy("cluster")], SimConfig(hosts=3, hours=4))
        return [{k: v for k, v in r.summary().items() if k != "vm_hours_per_s"} for r in results]

    assert once() == once()


def test_a_csv_trace_drives_the_vms(tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    with open(trace, "w") as f:
        f.write("time_s,vm,committed_bytes\n")
        for t in range(0, 7200, 600):
            for v in range(6):
                f.write(f"{t},db{v},{(512 + 256 * ((t // 600 + v) % 4)) << 20}\n")
    r = _simulate(
        "--trace", str(trace), "--hosts", "2", "--hours", "2", "--out", str(tmp_path / "t")
    )
    assert r.returncode == 0, r.stderr
    assert "2 hosts" in r.stdout and "6 VMs" in r.stdout
    trace.write_text("0,db0\n")
    r = _simulate(
        "--trace", str(trace), "--hosts", "2", "--hours", "1", "--out", str(tmp_path / "t")
    )
    assert r.returncode == 2 and "expected time_s,vm,committed_bytes" in r.stderr


def test_a_policy_that_breaks_the_rules_is_refused_with_the_reason(tmp_path: Path) -> None:
    bad = tmp_path / "stay.py"
    bad.write_text(
        "from pyhv.cluster.policy import Move, Plan\n"
        "def plan(s):\n"
        "    return Plan((Move(s.vm_ids[0], s.hosts[s.vm_host[0]], s.hosts[s.vm_host[0]]),))\n"
    )
    r = _simulate(
        "--hosts",
        "2",
        "--vms",
        "20",
        "--hours",
        "1",
        "--policy",
        str(bad),
        "--out",
        str(tmp_path / "b"),
    )
    assert r.returncode == 2 and "to the host it runs on" in r.stderr, r.stderr
