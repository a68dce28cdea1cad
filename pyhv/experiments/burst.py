"""A burst of allocation (issue 14, item 5): the reference guest commits `burst_mib` MiB at once
under an in-process VMMS and its balancer. Its DM VSC reports the rise at once, the balancer
answers with an early tick, and the guest's testlimit says on its own clock how long it waited
for memory. Measured: from the typed command to the burst's report at the VMMS, from the report
to the balancer's decision and to the memory added (as the VMMS hears of it)."""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pyhv.dynmem.balancer import PAGES_PER_MIB, BalancerConfig, Decision
from pyhv.dynmem.status import MemoryStatus
from pyhv.experiments.lab import ExperimentError, Lab


@dataclass(frozen=True)
class BurstResult:
    burst_mib: int
    typed_to_report_s: float
    report_to_decision_s: float | None  #: None: no decision with an operation after the report
    report_to_added_s: float
    committed_mib: int  #: testlimit's, as the guest's `tasks` says
    allocated_mib: int
    guest_longest_wait_ms: int
    guest_all_allocated_ms: int
    status_bursts: int  #: reports the guest's VSC sent at once for a sharp rise


def run_burst(out: Path, burst_mib: int = 1024, budget_mib: int = 4096) -> BurstResult:
    """One VM (startup 512 MiB, minimum 256, maximum 2048) at rest, then `testlimit -m
    burst_mib`; returns once testlimit has all it committed."""
    pushes: list[tuple[float, MemoryStatus]] = []
    decided: list[float] = []
    lock = threading.Lock()

    def pushed(_name: str, st: MemoryStatus) -> None:
        with lock:
            pushes.append((time.monotonic(), st))

    def first(since: float, pred: object) -> float | None:
        with lock:
            return next((t for t, st in pushes if t > since and pred(st)), None)  # type: ignore[operator]

    def wait(what: str, pred: object, timeout: float) -> float:
        end = time.monotonic() + timeout
        while (got := pred()) is None:  # type: ignore[operator]
            if time.monotonic() > end:
                raise ExperimentError(f"{what} did not happen within {timeout:.0f} s")
            time.sleep(0.01)
        return got  # type: ignore[no-any-return]

    with Lab(out, budget_mib=budget_mib, balancer=BalancerConfig()) as lab:
        lab.create("burst", memory="512M", minimum="256M", maximum="2048M")
        console = lab.start("burst")
        lab.vmms.status_listeners.append(pushed)

        def decision(d: Decision, _states: object) -> None:
            if d.operations:
                decided.append(time.monotonic())

        lab.vmms.balancer.decision_listeners.append(decision)
        lab.begin()
        console.wait_prompt()
        lab.wait_reporting("burst")
        lab.wait_stable("burst", 2.0, 60, "the VM at rest")
        with lock:
            base = pushes[-1][1]
        if base.committed_pages is None:
            raise ExperimentError("the VM at rest has not reported its commit")
        rise = base.committed_pages + (burst_mib - 16) * PAGES_PER_MIB
        t0 = time.monotonic()
        console.run(f"testlimit -m {burst_mib} -c 1", b"committed")
        t_report = wait(
            "a status report with the burst",
            lambda: first(t0, lambda st: (st.committed_pages or 0) >= rise),
            30,
        )
        t_added = wait(
            "memory added after the burst",
            lambda: first(t_report, lambda st: st.assigned_pages > base.assigned_pages),
            60,
        )
        tasks = ""
        end = time.monotonic() + 120
        while "all allocated after" not in tasks:
            if time.monotonic() > end:
                raise ExperimentError(f"testlimit did not get all it committed: {tasks}")
            tasks = console.run("tasks").decode(errors="replace")
        dm = console.run("dm").decode(errors="replace")
    sizes = re.search(r"testlimit committed (\d+) MiB, allocated (\d+) MiB", tasks)
    waits = re.search(r"longest wait for memory (\d+) ms, all allocated after (\d+) ms", tasks)
    bursts = re.search(r"status-bursts: (\d+)", dm)
    if sizes is None or waits is None or bursts is None:
        raise ExperimentError(f"the guest's tasks or dm output is not understood: {tasks} {dm}")
    t_decided = next((t for t in decided if t >= t_report), None)
    committed, allocated = map(int, sizes.groups())
    wait_ms, full_ms = map(int, waits.groups())
    return BurstResult(
        burst_mib,
        t_report - t0,
        None if t_decided is None else t_decided - t_report,
        t_added - t_report,
        committed,
        allocated,
        wait_ms,
        full_ms,
        int(bursts.group(1)),
    )
