r"""`\Hyper-V Dynamic Memory VM(vm)\Memory Demand` (MB) and `...\Memory Status` (0 OK, 1 Low,
2 Warning) after a balancer tick, from the VM's report, settings and the host's free memory."""

from __future__ import annotations

import pytest

from pyhv.counters import CounterRegistry
from pyhv.counters.dynmem import VM, DynamicMemoryCounters
from pyhv.dynmem.balancer import (
    HostMemory,
    MemorySettings,
    StatusReport,
    VmMemoryState,
    decide,
    pages_from_mib,
)

pytestmark = pytest.mark.unit

MIB = pages_from_mib(1)
PATH = f"\\{VM}(testvm)\\"


def _tick(committed_mib: int | None, maximum_mib: int, free_mib: int) -> dict[str, float]:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry)
    vm = VmMemoryState(
        "testvm",
        MemorySettings.from_mib(512, 256, maximum_mib),
        visible_pages=1024 * MIB,
        assigned_pages=1024 * MIB,
        report=None if committed_mib is None else StatusReport(committed_mib * MIB, 0),
    )
    dm.record_tick([vm], decide(HostMemory(free_pages=free_mib * MIB), [vm]))
    return registry.snapshot()


def test_demand_in_mb_and_ok_when_the_host_can_cover_the_buffer() -> None:
    snap = _tick(1000, 4096, 4096)
    assert snap[PATH + "Memory Demand"] == 1000.0
    assert snap[PATH + "Memory Status"] == 0


def test_low_when_the_maximum_leaves_the_buffer_short() -> None:
    assert _tick(1000, 1024, 4096)[PATH + "Memory Status"] == 1


def test_warning_when_demand_passes_what_the_vm_can_be_given() -> None:
    assert _tick(1100, 1024, 4096)[PATH + "Memory Status"] == 2


def test_before_the_guest_reported_both_stay_at_zero_like_the_pressures() -> None:
    snap = _tick(None, 4096, 4096)
    assert snap[PATH + "Memory Demand"] == 0 and snap[PATH + "Memory Status"] == 0
