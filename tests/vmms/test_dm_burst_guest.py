"""Pressure that follows a burst (issue 14, item 5), with the reference guest under an in-process
VMMS and its balancer (pyhv.experiments.burst): the guest commits 1 GiB at once; its DM VSC
reports the rise at once (not at the next second), the balancer answers with an early tick, and
the guest's testlimit never waits a second for memory (the guest's own clock), nor fails to get
it."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.experiments.burst import run_burst

pytestmark = pytest.mark.guest


def test_a_burst_of_1_gib_is_reported_at_once_and_answered_with_no_stall_over_a_second(
    tmp_path: Path,
) -> None:
    r = run_burst(tmp_path, burst_mib=1024)
    # the guest reported the rise at once, outside its once-a-second rhythm
    assert r.status_bursts >= 1
    # the balancer answered that report with an early tick (its regular tick is a second)
    assert r.report_to_decision_s is not None and r.report_to_decision_s < 0.9, r
    # the guest never waited a second for memory, and got all it committed
    assert r.committed_mib == r.allocated_mib == 1024
    assert r.guest_longest_wait_ms < 1000, r
    print(f"{r} (measured on PVM)")
