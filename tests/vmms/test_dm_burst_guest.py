"""Pressure that follows a burst (issue 14, item 5), with the reference guest under an in-process
VMMS and its balancer: the guest commits 1 GiB at once; its DM VSC reports the rise at once (not
at the next second), the balancer answers with an early tick, and the guest's testlimit never
waits a second for memory (the guest's own clock), nor fails to get it."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from pyhv.dynmem.balancer import PAGES_PER_MIB, BalancerConfig, Decision
from pyhv.dynmem.status import MemoryStatus
from pyhv.experiments.lab import Lab
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

BURST_MIB = 1024


def test_a_burst_of_1_gib_is_reported_at_once_and_answered_with_no_stall_over_a_second(
    tmp_path: Path,
) -> None:
    statuses: list[tuple[float, MemoryStatus]] = []
    decisions: list[tuple[float, Decision]] = []
    lock = threading.Lock()

    def pushed(name: str, st: MemoryStatus) -> None:
        with lock:
            statuses.append((time.monotonic(), st))

    with Lab(tmp_path, budget_mib=4096, balancer=BalancerConfig()) as lab:
        lab.create("burst", memory="512M", minimum="256M", maximum="2048M")
        console = lab.start("burst")
        lab.vmms.status_listeners.append(pushed)
        lab.vmms.balancer.decision_listeners.append(
            lambda d, _s: d.operations and decisions.append((time.monotonic(), d))
        )
        lab.begin()
        console.wait_prompt()
        lab.wait_reporting("burst")
        lab.wait_stable("burst", 2.0, 60, "the VM at rest")
        with lock:
            before = statuses[-1][1]
        assert before.committed_pages is not None
        t0 = time.monotonic()
        console.run(f"testlimit -m {BURST_MIB} -c 1", b"committed")

        def burst_report() -> tuple[float, MemoryStatus] | None:
            with lock:
                return next(
                    (
                        (t, s)
                        for t, s in statuses
                        if t > t0
                        and (s.committed_pages or 0)
                        >= before.committed_pages + (BURST_MIB - 16) * PAGES_PER_MIB  # type: ignore[operator]
                    ),
                    None,
                )

        assert wait_for(burst_report, 30, "a status report with the burst")
        t_report, _ = burst_report()  # type: ignore[misc]

        def added() -> float | None:
            with lock:
                return next(
                    (
                        t
                        for t, s in statuses
                        if t > t_report and s.assigned_pages > before.assigned_pages
                    ),
                    None,
                )

        assert wait_for(added, 60, "memory added after the burst")
        tasks = ""

        def all_allocated() -> bool:
            nonlocal tasks
            tasks = console.run("tasks").decode(errors="replace")
            return "all allocated after" in tasks

        assert wait_for(all_allocated, 120, "testlimit allocated all it committed")
        dm = console.run("dm").decode(errors="replace")

    # the guest reported the rise at once, outside its once-a-second rhythm
    assert int(re.search(r"status-bursts: (\d+)", dm).group(1)) >= 1  # type: ignore[union-attr]
    # the balancer answered that report with an early tick (its regular tick is a second)
    assert any(t_report <= t < t_report + 0.9 for t, _ in decisions), (t_report, decisions)
    # the guest never waited a second for memory, and got all it committed
    m = re.search(
        r"testlimit committed (\d+) MiB, allocated (\d+) MiB.*longest wait for memory (\d+) ms, "
        r"all allocated after (\d+) ms",
        tasks,
    )
    assert m is not None, tasks
    committed, allocated, longest_wait, full_ms = map(int, m.groups())
    assert committed == allocated == BURST_MIB
    assert longest_wait < 1000, tasks
    print(
        f"burst of {BURST_MIB} MiB (measured on PVM): report -> memory added "
        f"{(added() or 0) - t_report:.3f} s; guest: longest wait {longest_wait} ms, all "
        f"allocated after {full_ms} ms"
    )
