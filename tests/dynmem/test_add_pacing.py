"""Add pacing: the book's second jump. One add gives at most `max_add_pages`; a VM that wanted
more gets the rest only after `add_settle_s`, if it is still below target then."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pyhv.dynmem.balancer import (
    Add,
    BalancerConfig,
    HostMemory,
    MemorySettings,
    StatusReport,
    VmMemoryState,
    applied,
    decide,
)

pytestmark = pytest.mark.unit

MIB = 256
PACED = BalancerConfig(max_add_pages=512 * MIB, add_settle_s=30.0)


def run(config: BalancerConfig, seconds: int) -> list[tuple[int, int]]:
    """A 512 MiB VM whose demand jumps by 1000 MiB at t = 0: (t, pages added) per add."""
    settings = MemorySettings.from_mib(startup=512, minimum=256, maximum=4096)
    vm = VmMemoryState("vm", settings, 512 * MIB, 512 * MIB, report=StatusReport(1400 * MIB))
    adds = []
    for t in range(seconds):
        d = decide(HostMemory(8192 * MIB), [vm], config)
        op = d.operation_for("vm")
        if isinstance(op, Add):
            adds.append((t, op.pages))
        vm = replace(vm, above_target_s=d.above_target_s[0], add_hold_s=d.add_hold_s[0])
        vm = applied(vm, op)
    return adds


def test_without_pacing_the_whole_demand_is_added_at_once() -> None:
    assert [t for t, _ in run(BalancerConfig(), 60)] == [0]


def test_the_balancer_adds_again_when_the_first_addition_did_not_relieve_the_pressure() -> None:
    adds = run(PACED, 70)
    assert [t for t, _ in adds] == [0, 30, 60]
    assert adds[0][1] == adds[1][1] == 512 * MIB
    assert sum(p for _, p in adds) == 1680 * MIB - 512 * MIB  # 1400 MiB + 20 %


def test_the_settle_time_follows_the_time_scale() -> None:
    adds = run(replace(PACED, time_scale=0.1), 10)
    assert [t for t, _ in adds] == [0, 3, 6]


def test_a_vm_below_its_minimum_is_not_held_by_the_settle_time() -> None:
    settings = MemorySettings.from_mib(startup=512, minimum=512, maximum=4096)
    vm = VmMemoryState("vm", settings, 512 * MIB, 256 * MIB, 256 * MIB, StatusReport(10 * MIB))
    d = decide(HostMemory(8192 * MIB), [replace(vm, add_hold_s=20.0)], PACED)
    assert d.operation_for("vm") == Add("vm", 256 * MIB, 256 * MIB, 0)
