"""The "Hyper-V Dynamic Memory Balancer" and "Hyper-V Dynamic Memory VM" counters, fed by
balancer ticks and completed operations."""

from __future__ import annotations

import pytest

from pyhv.counters import CounterRegistry
from pyhv.counters.dynmem import BALANCER, VM, VM_SET, DynamicMemoryCounters
from pyhv.dynmem.balancer import (
    Add,
    HostMemory,
    MemorySettings,
    Remove,
    StatusReport,
    VmMemoryState,
    decide,
    pages_from_mib,
)

pytestmark = pytest.mark.unit

MIB = pages_from_mib(1)


def state(
    committed_mib: int | None, assigned_mib: int = 1000, visible_mib: int = 1200
) -> VmMemoryState:
    return VmMemoryState(
        "testvm",
        MemorySettings.from_mib(1024, 256, 4096),
        visible_pages=visible_mib * MIB,
        assigned_pages=assigned_mib * MIB,
        ballooned_pages=(visible_mib - assigned_mib) * MIB,
        report=None if committed_mib is None else StatusReport(committed_mib * MIB, 300 * MIB),
    )


def test_the_vm_set_has_the_books_counters() -> None:
    assert [c.name for c in VM_SET.counters] == [
        "Guest Visible Physical Memory",
        "Physical Memory",
        "Guest Available Memory",
        "Current Pressure",
        "Average Pressure",
        "Maximum Pressure",
        "Minimum Pressure",
        "Added Memory",
        "Removed Memory",
        "Memory Add Operations",
        "Memory Remove Operations",
        "Memory Demand",
        "Memory Status",
        "Smart Paging Working Set Size",
        "Smart Paging In Use",
        "Smart Paging File Size",
    ]


def test_a_tick_sets_physical_and_guest_visible_memory_in_mb_and_the_pressures() -> None:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry, window=3)
    host = HostMemory(free_pages=4096 * MIB, reserve_pages=1024 * MIB)
    for committed in (800, 1000, 1200, 900):
        vms = [state(committed)]
        dm.record_tick(vms, decide(host, vms))
    snap = registry.snapshot()
    vm = f"\\{VM}(testvm)\\"
    assert snap[vm + "Physical Memory"] == 1000.0
    assert snap[vm + "Guest Visible Physical Memory"] == 1200.0
    assert snap[vm + "Guest Available Memory"] == 300.0
    assert snap[vm + "Current Pressure"] == 90.0
    # The window holds the last three ticks: 100, 120, 90.
    assert snap[vm + "Average Pressure"] == pytest.approx((100 + 120 + 90) / 3)
    assert snap[vm + "Maximum Pressure"] == 120.0
    assert snap[vm + "Minimum Pressure"] == 90.0
    assert snap[f"\\{BALANCER}\\Available Memory"] == 3072.0
    assert snap[f"\\{BALANCER}\\Average Pressure"] == 90.0
    assert snap[f"\\{BALANCER}\\System Current Pressure"] == 90.0


def test_a_vm_that_has_not_reported_yet_leaves_its_pressure_window_empty() -> None:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry)
    vms = [state(None)]
    dm.record_tick(vms, decide(HostMemory(0), vms))
    assert dm.vm.get("Average Pressure", "testvm") == 0.0
    assert dm.vm.get("Physical Memory", "testvm") == 1000.0


def test_added_and_removed_memory_count_mb_and_operations_not_pages() -> None:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry)
    dm.record_operation(Add("testvm", 200 * MIB, 100 * MIB, 100 * MIB))
    dm.record_operation(Add("testvm", 56 * MIB, 0, 56 * MIB))
    dm.record_operation(Remove("testvm", 128 * MIB))
    assert dm.vm.get("Added Memory", "testvm") == 256.0
    assert dm.vm.get("Memory Add Operations", "testvm") == 2
    assert dm.vm.get("Removed Memory", "testvm") == 128.0
    assert dm.vm.get("Memory Remove Operations", "testvm") == 1


def test_a_deleted_vm_disappears_from_the_counters() -> None:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry)
    dm.record_operation(Remove("testvm", MIB))
    dm.forget_vm("testvm")
    assert dm.vm.instances() == []
