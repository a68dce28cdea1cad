"""Memory contention between three weighted Dynamic Memory VMs with bursty Testlimit workloads
on a 2 GiB host (6 GiB of maxima), end to end under KVM at time scale 0.07."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pyhv.experiments.contention import ContentionConfig, ContentionResult, run_contention
from pyhv.experiments.lab import PHYSICAL
from tests.experiments.series import series

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ContentionResult, Path]:
    out = tmp_path_factory.mktemp("contention")
    config = ContentionConfig(out=out, time_scale=0.07)
    return run_contention(config, say=lambda _: None), out


def test_no_vm_is_ever_given_less_than_its_minimum(run: tuple[ContentionResult, Path]) -> None:
    result, out = run
    for name, vm in result.vms.items():
        values = [v for _, v in series(out / "counters.csv", name, PHYSICAL)]
        assert values and min(values) >= vm["minimum"], name
    # and the host was really short: the VMs used all of it at some point
    assert result.peak_used_mib >= result.budget_mib - 64


def test_when_the_host_is_short_the_higher_weight_vm_gets_memory_first(
    run: tuple[ContentionResult, Path],
) -> None:
    result, _ = run
    ops: dict[str, Any] = result.first_short_tick["operations"]
    assert ops["A"] > ops.get("C", 0) >= 0  # weight 80 before weight 20, in one tick
    assert ops.get("B", 0) < 0  # the idle VM's surplus is taken at once, not lazily
    # Measured in every status the pool took (a counter sample can fall after C's second add):
    # when A first grew, C had less than A.
    at = result.at_first_growth
    assert at and at["C"] < at["A"], at


def test_dynamic_memory_runs_the_vms_in_less_than_static_allocation_at_their_peaks(
    run: tuple[ContentionResult, Path],
) -> None:
    result, _ = run
    assert result.peak_used_mib <= result.budget_mib
    # The pool's own accounting, at every status: the balancer never gave out more than it has.
    assert result.pool_peak_mib <= result.budget_mib
    assert result.sum_of_peaks_mib > result.budget_mib
    assert result.density > 1.0
    assert (Path(result.png)).stat().st_size > 10_000
