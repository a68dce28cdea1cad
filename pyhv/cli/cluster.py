"""`pyhv cluster ...`: the fleet simulator (`simulate`) and the cluster balancer's plan for a
live cluster (`balance --dry-run`). docs/cluster.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cluster",
        help="pyhv on many hosts: fleet simulator, cluster balancer (docs/cluster.md)",
        description="pyhv on many hosts (docs/cluster.md).",
    )
    cmds = p.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    s = cmds.add_parser(
        "simulate",
        help="run placement and the balancers on a simulated fleet",
        description="Run the same placement, host balancer and cluster balancing policies on "
        "simulated hosts and VMs driven by a workload trace, compressed in time; compare the "
        "policies side by side (table, CSV, PNG).",
    )
    s.add_argument("--hosts", type=int, default=100, help="hosts (default 100)")
    s.add_argument(
        "--vms", type=int, default=10000, help="VMs of the synthetic trace (default 10000)"
    )
    s.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    s.add_argument(
        "--policy",
        action="append",
        metavar="P",
        help="host-only, cluster, a .py file or module[:attribute] (repeat to compare; "
        "default: host-only and cluster)",
    )
    s.add_argument("--seed", type=int, default=1, help="the synthetic trace's seed (default 1)")
    s.add_argument(
        "--trace",
        type=Path,
        metavar="CSV",
        help="committed memory per VM over time (rows time_s,vm,committed_bytes) instead of "
        "the synthetic trace",
    )
    s.add_argument(
        "--host-memory",
        type=types.size,
        metavar="SIZE",
        help="each host's memory for VMs (default: the fleet's startup memory fills the hosts)",
    )
    s.add_argument(
        "--step",
        type=float,
        default=60.0,
        help="simulated seconds per host-balancer tick (default 60)",
    )
    s.add_argument(
        "--cluster-every",
        type=float,
        default=300.0,
        metavar="S",
        help="simulated seconds between two cluster balancer decisions (default 300)",
    )
    s.add_argument(
        "--out",
        type=Path,
        default=Path("cluster-simulation"),
        metavar="PREFIX",
        help="writes PREFIX.csv and PREFIX.png (default %(default)s)",
    )
    s.set_defaults(func=simulate_command)


def simulate_command(a: argparse.Namespace) -> int:
    from pyhv.cluster.policies import load_policy
    from pyhv.cluster.policy import PolicyError
    from pyhv.cluster.simreport import table, write_csv, write_png
    from pyhv.cluster.simulator import SimConfig, SimulationError, simulate_many
    from pyhv.cluster.workloads import TraceError, from_csv, synthetic

    try:
        policies = [load_policy(p) for p in (a.policy or ["host-only", "cluster"])]
        config = SimConfig(
            hosts=a.hosts,
            hours=a.hours,
            step_s=a.step,
            cluster_every_s=a.cluster_every,
            host_memory=a.host_memory or 0,
        )
        if a.vms < 1:
            raise SimulationError(f"--vms {a.vms}: give 1 or more")
        fleet = from_csv(a.trace) if a.trace else synthetic(a.vms, a.seed, a.hours)
        results = simulate_many(fleet, policies, config)
    except (PolicyError, SimulationError, TraceError, ValueError) as e:
        raise CliError(str(e), 2) from None
    print(table(results), end="")
    csv_path, png_path = a.out.with_suffix(".csv"), a.out.with_suffix(".png")
    try:
        if a.out.parent != Path(""):
            a.out.parent.mkdir(parents=True, exist_ok=True)
        write_csv(results, csv_path)
        write_png(results, png_path)
    except OSError as e:
        raise CliError(f"cannot write {csv_path} / {png_path}: {e}") from None
    print(f"wrote {csv_path} and {png_path}", file=sys.stderr)
    print(json.dumps({"results": [r.summary() for r in results]}))
    return 0
