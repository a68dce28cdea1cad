"""The book's "Watching Dynamic Memory" experiment, simulated: a VM whose committed memory
follows Testlimit's timeline, run through the balancer tick by tick."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import pytest

from pyhv.dynmem.balancer import (
    BalancerConfig,
    Decision,
    HostMemory,
    MemorySettings,
    StatusReport,
    VmMemoryState,
    applied,
    decide,
    host_after,
    pages_from_mib,
)
from tests.support.testlimit import END, MORE, START, committed_under_testlimit

pytestmark = pytest.mark.simulation

MIB = pages_from_mib(1)


def tick(
    host: HostMemory, vms: list[VmMemoryState], config: BalancerConfig
) -> tuple[HostMemory, list[VmMemoryState], Decision]:
    """One balancer tick whose operations complete before the next one."""
    d = decide(host, vms, config)
    after = [
        applied(replace(state, above_target_s=timer), d.operation_for(state.vm))
        for state, timer in zip(vms, d.above_target_s, strict=True)
    ]
    return host_after(host, d.operations), after, d


def simulate(
    seconds: int, config: BalancerConfig, committed: Callable[[int], int]
) -> list[tuple[int, int]]:
    """Run the balancer once a second. Returns (Guest Visible Physical Memory, Physical
    Memory) in pages after each tick."""
    host = HostMemory(free_pages=8192 * MIB, reserve_pages=1024 * MIB)
    state = VmMemoryState(
        "testvm",
        MemorySettings.from_mib(startup=512, minimum=256, maximum=4096),
        visible_pages=512 * MIB,
        assigned_pages=512 * MIB,
    )
    trace = []
    for t in range(seconds):
        state = replace(state, report=StatusReport(committed(t)))
        host, (state,), _ = tick(host, [state], config)
        trace.append((state.visible_pages, state.assigned_pages))
    return trace


def test_memory_jumps_within_a_second_of_testlimit_and_both_counters_reach_the_same_value() -> None:
    trace = simulate(START + 2, BalancerConfig(), committed_under_testlimit)
    assert trace[START - 1] == (512 * MIB, 512 * MIB)
    visible, physical = trace[START]
    assert physical > 1400 * MIB
    assert visible == physical


def test_memory_is_added_again_when_the_first_addition_proves_not_enough() -> None:
    trace = simulate(MORE + 2, BalancerConfig(), committed_under_testlimit)
    first = trace[START][1]
    assert all(p == first for _, p in trace[START:MORE])
    assert trace[MORE][1] > first
    assert trace[MORE][0] == trace[MORE][1]


def test_after_testlimit_ends_the_levels_stay_for_minutes_then_physical_memory_is_trimmed() -> None:
    config = BalancerConfig()
    trace = simulate(END + 240, config, committed_under_testlimit)
    peak = trace[END - 1]
    delay = int(config.remove_delay_s)
    # Constant for the lazy delay ("several minutes")...
    assert all(sample == peak for sample in trace[END : END + delay - 1])
    # ...then Physical Memory drops back near its level before Testlimit, in steps, while
    # Guest Visible Physical Memory stays where it was.
    visible, physical = trace[-1]
    assert visible == peak[0]
    assert physical <= 1.05 * 512 * MIB
    drops = {p for _, p in trace[END + delay - 1 :]}
    assert len(drops) > 2, "trimmed in several steps, not in one"


def test_a_shorter_time_scale_brings_the_trim_forward() -> None:
    scaled = simulate(END + 40, BalancerConfig(time_scale=0.1), committed_under_testlimit)
    normal = simulate(END + 40, BalancerConfig(), committed_under_testlimit)
    assert scaled[-1][1] < normal[-1][1] == normal[END - 1][1]


def test_on_a_short_host_the_higher_weight_vm_gets_its_demand_from_the_lower_weight_vm() -> None:
    """2300 MiB for VMs; high (weight 90) demands 1800, low (weight 10) demands 1500."""
    config = BalancerConfig()
    host = HostMemory(free_pages=500 * MIB, reserve_pages=200 * MIB)
    vms = [
        VmMemoryState(
            name,
            MemorySettings.from_mib(512, 256, 4096, weight=weight),
            visible_pages=1000 * MIB,
            assigned_pages=1000 * MIB,
            report=StatusReport(committed * MIB),
        )
        for name, weight, committed in (("high", 90, 1800), ("low", 10, 1500))
    ]
    decisions = []
    for _ in range(10):
        host, vms, d = tick(host, vms, config)
        decisions.append(d)
    high, low = vms
    assert high.assigned_pages == 1800 * MIB  # its demand; the buffer was dropped
    assert low.assigned_pages == 500 * MIB  # what is left, above its 256 MiB minimum
    assert host.free_pages == host.reserve_pages  # the reserve is untouched
    assert all(d.host_short for d in decisions)
    assert all(d.operations == () for d in decisions[3:]), "it settles, no back and forth"
