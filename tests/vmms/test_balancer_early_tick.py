"""The VMMS's balancer loop answers a spike at once: between its once-a-second ticks it looks at
the workers' reports, and a report that puts a VM below its target gets an early tick."""

from __future__ import annotations

import threading

import pytest

from pyhv.dynmem.balancer import PAGE_SIZE, BalancerConfig, MemorySettings
from pyhv.vmms.balancing import BalancerLoop
from pyhv.vmms.pool import HostPool
from tests.vmms.fakes import MIB, FakeStatusWorker

pytestmark = pytest.mark.simulation

SETTINGS = MemorySettings.from_mib(startup=512, minimum=256, maximum=4096)
#: A tick so long that only an early tick can answer within the test.
SLOW = BalancerConfig(tick_s=1000.0)


def _running(w: FakeStatusWorker) -> tuple[BalancerLoop, threading.Event, threading.Thread]:
    pool = HostPool(8192 << 20)
    pool.admit("testvm", SETTINGS.startup_pages * PAGE_SIZE)
    w.attach(pool, "testvm")
    loop = BalancerLoop(pool, lambda: {"testvm": (SETTINGS, w)}, config=SLOW)
    loop.tick()  # the loop has seen the VM at rest
    stop = threading.Event()
    t = threading.Thread(target=loop.run, args=(stop, 0.01), daemon=True)
    t.start()
    return loop, stop, t


def _decided(loop: BalancerLoop) -> threading.Event:
    """Set at the first decision with an operation (the loop's decision listeners)."""
    decided = threading.Event()
    loop.decision_listeners.append(lambda d, _states: d.operations and decided.set())
    return decided


def test_a_report_showing_a_spike_is_answered_before_the_next_tick() -> None:
    w = FakeStatusWorker(512 * MIB, committed=427 * MIB)  # at target: 427 MiB + 20 % = 512 MiB
    loop, stop, t = _running(w)
    decided = _decided(loop)
    try:
        w.committed = 1427 * MIB  # testlimit commits 1000 MiB
        assert decided.wait(10), "no early tick within 10 s of the report"
        assert w.targets[0] >= 1427 * MIB * 1.2  # demand plus the 20 % buffer
    finally:
        stop.set()
        t.join(5)


def test_a_vm_at_rest_gets_no_early_tick() -> None:
    w = FakeStatusWorker(512 * MIB, committed=427 * MIB)
    loop, stop, t = _running(w)
    first = loop.last_decision
    try:
        w.committed = 420 * MIB  # a new report, still under target: nothing to answer
        # thirty looks at it (one may have begun before the report: the other 29 saw it)
        assert loop.wait_looks(loop.looks + 30, timeout=60)
        assert loop.last_decision is first and w.targets == []
    finally:
        stop.set()
        t.join(5)


def test_an_early_tick_advances_the_lazy_timers_by_the_time_really_elapsed() -> None:
    idle = FakeStatusWorker(1024 * MIB, committed=100 * MIB)  # far above target: its timer runs
    busy = FakeStatusWorker(512 * MIB, committed=427 * MIB)
    vms = {"idle": (SETTINGS, idle), "busy": (SETTINGS, busy)}
    pool = HostPool(8192 << 20)
    pool.admit("idle", 1024 << 20)
    pool.admit("busy", SETTINGS.startup_pages * PAGE_SIZE)
    idle.attach(pool, "idle")
    busy.attach(pool, "busy")
    loop = BalancerLoop(pool, lambda: vms, config=BalancerConfig(tick_s=1000.0, remove_delay_s=1e6))
    d = loop.tick()
    assert d is not None and d.above_target_s[0] == 1000.0  # one (long) regular tick
    stop = threading.Event()
    decided = _decided(loop)
    t = threading.Thread(target=loop.run, args=(stop, 0.01), daemon=True)
    t.start()
    try:
        busy.committed = 1427 * MIB
        assert decided.wait(10), "no early tick within 10 s of the report"
        d = loop.last_decision
        assert d is not None and 1000.0 < d.above_target_s[0] < 1100.0
    finally:
        stop.set()
        t.join(5)
