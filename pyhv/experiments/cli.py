"""`pyhv experiment ...`: the book's experiments from the command line."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from pyhv.experiments.lab import ExperimentError

F = TypeVar("F", bound=Callable[..., Any])


@click.group("experiment", context_settings={"help_option_names": ["-h", "--help"]})
def experiment_group() -> None:
    """The book's experiments with real guests under KVM (docs/experiments.md)."""


def _need_kvm() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise click.ClickException(
            "the experiments run real guests: /dev/kvm is missing or not accessible to you"
        )


def _scale(value: float) -> float:
    if not value > 0:
        raise click.BadParameter(
            f"must be > 0 (0.1 makes the delays ten times shorter), got {value}"
        )
    return value


def _out_option(default: str) -> Callable[[F], F]:
    return click.option(
        "--out",
        type=click.Path(file_okay=False, path_type=Path),
        default=Path(default),
        show_default=True,
        help="directory for the chart, the counters' CSV and the account",
    )


def _time_scale_option(default: float, help_text: str) -> Callable[[F], F]:
    return click.option(
        "--time-scale",
        type=float,
        default=default,
        show_default=True,
        callback=lambda _c, _p, v: _scale(v),
        help=help_text,
    )


def _print_account(run: Callable[[], Any]) -> None:
    """Run an experiment and print its account; an ExperimentError becomes the command's error."""
    try:
        result = run()
    except ExperimentError as e:
        raise click.ClickException(str(e)) from None
    click.echo("")
    click.echo(result.account())


@experiment_group.command("watch-dynamic-memory")
@_out_option("out/watch-dynamic-memory")
@_time_scale_option(
    1.0,
    "multiplies the balancer's delays (trim after 180 s, add settle 30 s); 0.1 = ten times sooner",
)
@click.option("--startup", "startup_mib", type=int, default=768, show_default=True, help="MiB")
@click.option("--testlimit", "testlimit_mb", type=int, default=1000, show_default=True, help="MiB")
@click.option(
    "--hold",
    "hold_s",
    type=float,
    default=5.0,
    show_default=True,
    help="seconds testlimit runs once the adds are done",
)
def watch_command(out: Path, time_scale: float, startup_mib: int, **kw: Any) -> None:
    """Watching Dynamic Memory: testlimit in a Dynamic Memory VM, two jumps of Guest Visible
    Physical Memory and Physical Memory, kill, and the lazy trim of Physical Memory."""
    from pyhv.experiments.watch_dynamic_memory import WatchConfig, run_watch

    _need_kvm()

    config = WatchConfig(
        out=out, time_scale=time_scale, startup_mib=startup_mib, minimum_mib=startup_mib, **kw
    )
    bal = config.balancer()
    settle, delay = bal.effective_add_settle_s, bal.effective_remove_delay_s
    about = config.rest_s + 2 * settle + 5 + config.hold_s + delay + 8 + config.after_s
    click.echo(
        f"Watching Dynamic Memory at time scale {time_scale:g}: the balancer waits {settle:g} s "
        f"between paced adds and trims after {delay:g} s above target (the book's pace is time "
        f"scale 1: 30 s and 180 s). This takes about {about:.0f} s."
    )
    _print_account(lambda: run_watch(config, say=click.echo))


@experiment_group.command("contention")
@_out_option("out/contention")
@_time_scale_option(0.1, "multiplies the balancer's delays and the workload timeline")
def contention_command(out: Path, time_scale: float) -> None:
    """Three weighted VMs with bursty Testlimit workloads on a host smaller than the sum of
    their maxima: who gets memory, nobody below minimum, density against static allocation."""
    from pyhv.experiments.contention import ContentionConfig, run_contention

    _need_kvm()

    _print_account(
        lambda: run_contention(ContentionConfig(out=out, time_scale=time_scale), say=click.echo)
    )
