"""`pyhv experiment ...`: the book's experiments with real guests under KVM."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError

_OUT_HELP = "directory for the chart, the counters' CSV and the account (default %(default)s)"


def register(sub: Any) -> None:
    p = sub.add_parser(
        "experiment",
        help="the book's experiments (docs/experiments.md)",
        description="The book's experiments with real guests under KVM (docs/experiments.md).",
    )
    cmds = p.add_subparsers(dest="experiment_command", metavar="COMMAND", required=True)
    c = _experiment(
        cmds,
        "watch-dynamic-memory",
        help="Watching Dynamic Memory (the book's experiment)",
        description="Watching Dynamic Memory: testlimit in a Dynamic Memory VM, two jumps of Guest "
        "Visible Physical Memory and Physical Memory, kill, and the lazy trim of Physical Memory.",
        time_scale=1.0,
        time_scale_help="multiplies the balancer's delays (trim after 180 s, add settle 30 s); 0.1 = ten times sooner (default 1)",
    )
    c.add_argument("--startup", dest="startup_mib", type=int, default=768, help="MiB (default 768)")
    c.add_argument(
        "--testlimit", dest="testlimit_mb", type=int, default=1000, help="MiB (default 1000)"
    )
    c.add_argument(
        "--hold",
        dest="hold_s",
        type=float,
        default=5.0,
        help="seconds testlimit runs once the adds are done (default 5)",
    )
    c.set_defaults(func=watch_command)
    c = _experiment(
        cmds,
        "contention",
        help="three weighted VMs contending for memory",
        description="Three weighted VMs with bursty Testlimit workloads on a host smaller than the "
        "sum of their maxima: who gets memory, nobody below minimum, density against static "
        "allocation.",
        time_scale=0.1,
        time_scale_help="multiplies the balancer's delays and the workload timeline (default 0.1)",
    )
    c.add_argument(
        "--page-file",
        type=types.size,
        metavar="SIZE",
        help="give each VM a page file of SIZE (e.g. 1G): a guest short of memory pages to it",
    )
    c.set_defaults(func=contention_command)
    c = cmds.add_parser(
        "cluster",
        help="three hosts: a short host relieved by live migration, then killed (HA restart)",
        description="Three VMMS hosts as network namespaces on a bridge (mutual TLS, etcd on the "
        "bridge), six highly available Dynamic Memory VMs: one host's VMs commit memory until it "
        "is short, the cluster balancer moves a VM away, then every process of that host is "
        "killed and its VMs restart on the others (docs/cluster.md). Needs root.",
    )
    c.add_argument(
        "--out",
        type=Path,
        default=Path("out/cluster/cluster"),
        metavar="PREFIX",
        help="writes PREFIX.csv and PREFIX.png (default %(default)s)",
    )
    c.add_argument("--lease-ttl", type=int, default=5, help="the hosts' lease, s (default 5)")
    c.set_defaults(func=cluster_command)


def _experiment(
    cmds: Any, name: str, *, help: str, description: str, time_scale: float, time_scale_help: str
) -> argparse.ArgumentParser:
    """An experiment's subcommand with the options every experiment has: --out, --time-scale."""
    c: argparse.ArgumentParser = cmds.add_parser(name, help=help, description=description)
    c.add_argument("--out", type=Path, default=Path(f"out/{name}"), help=_OUT_HELP)
    c.add_argument("--time-scale", type=types.positive, default=time_scale, help=time_scale_help)
    return c


def _need_kvm() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise CliError(
            "the experiments run real guests: /dev/kvm is missing or not accessible to you"
        )


def _print_account(run: Callable[[], Any]) -> int:
    """Run an experiment and print its account; an ExperimentError becomes the command's error."""
    from pyhv.experiments.lab import ExperimentError

    try:
        result = run()
    except ExperimentError as e:
        raise CliError(str(e)) from None
    print("")
    print(result.account())
    return 0


def _say(text: str) -> None:
    print(text, flush=True)


def watch_command(a: argparse.Namespace) -> int:
    from pyhv.experiments.watch_dynamic_memory import WatchConfig, run_watch

    _need_kvm()
    config = WatchConfig(
        out=a.out,
        time_scale=a.time_scale,
        startup_mib=a.startup_mib,
        minimum_mib=a.startup_mib,
        testlimit_mb=a.testlimit_mb,
        hold_s=a.hold_s,
    )
    bal = config.balancer()
    settle, delay = bal.effective_add_settle_s, bal.effective_remove_delay_s
    about = config.rest_s + 2 * settle + 5 + config.hold_s + delay + 8 + config.after_s
    _say(
        f"Watching Dynamic Memory at time scale {a.time_scale:g}: the balancer waits {settle:g} s "
        f"between paced adds and trims after {delay:g} s above target (the book's pace is time "
        f"scale 1: 30 s and 180 s). This takes about {about:.0f} s."
    )
    return _print_account(lambda: run_watch(config, say=_say))


def cluster_command(a: argparse.Namespace) -> int:
    import json

    from pyhv.cluster.experiment import ClusterExperimentError, run_cluster_experiment
    from pyhv.cluster.lab import LabError

    _need_kvm()
    if os.geteuid() != 0:
        raise CliError("the cluster experiment makes network namespaces and a bridge: run as root")
    try:
        summary = run_cluster_experiment(a.out, a.lease_ttl)
    except (ClusterExperimentError, LabError) as e:
        raise CliError(str(e)) from None
    print(json.dumps(summary))
    return 0


def contention_command(a: argparse.Namespace) -> int:
    from pyhv.experiments.contention import ContentionConfig, run_contention

    _need_kvm()
    return _print_account(
        lambda: run_contention(
            ContentionConfig(
                out=a.out, time_scale=a.time_scale, page_file_mib=(a.page_file or 0) >> 20
            ),
            say=_say,
        )
    )
