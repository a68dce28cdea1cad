"""The book's two Dynamic Memory counter sets, "Hyper-V Dynamic Memory Balancer" and
"Hyper-V Dynamic Memory VM", fed from the balancer's ticks and from completed operations.
Memory is in MB, as Perfmon shows it."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from pyhv.counters.registry import CounterDef, CounterRegistry, CounterSetDef
from pyhv.dynmem.balancer import (
    Add,
    Decision,
    Operation,
    Remove,
    VmMemoryState,
    mib_from_pages,
)
from pyhv.dynmem.status import HEALTH_GAUGE, memory_health

BALANCER = "Hyper-V Dynamic Memory Balancer"
VM = "Hyper-V Dynamic Memory VM"

BALANCER_SET = CounterSetDef(
    BALANCER,
    (
        CounterDef("Available Memory", "Memory left on the host for VMs, less its reserve", "MB"),
        CounterDef(
            "Available Memory For Balancing",
            "Available memory plus what VMs hold above their targets; negative when the VMs "
            "want more than the host has",
            "MB",
        ),
        CounterDef("Average Pressure", "Average pressure of the balanced VMs", "percent"),
        CounterDef(
            "System Current Pressure",
            "Demand of all balanced VMs over their assigned memory x 100",
            "percent",
        ),
    ),
    instance_label=None,
)

VM_SET = CounterSetDef(
    VM,
    (
        CounterDef(
            "Guest Visible Physical Memory",
            "Memory the guest OS believes it has (grows with hot-add, falls only with hot-remove)",
            "MB",
        ),
        CounterDef("Physical Memory", "Memory currently assigned to the VM", "MB"),
        CounterDef("Guest Available Memory", "Available memory the guest last reported", "MB"),
        CounterDef("Current Pressure", "Demand (committed) / Physical Memory x 100", "percent"),
        CounterDef("Average Pressure", "Pressure averaged over the recent window", "percent"),
        CounterDef("Maximum Pressure", "Highest pressure in the recent window", "percent"),
        CounterDef("Minimum Pressure", "Lowest pressure in the recent window", "percent"),
        CounterDef("Added Memory", "Memory added since the VM started", "MB", "cumulative"),
        CounterDef("Removed Memory", "Memory removed since the VM started", "MB", "cumulative"),
        CounterDef(
            "Memory Add Operations", "Add operations (not pages)", "operations", "cumulative"
        ),
        CounterDef(
            "Memory Remove Operations", "Remove operations (not pages)", "operations", "cumulative"
        ),
        CounterDef("Memory Demand", "Memory the guest commits (Hyper-V Manager's column)", "MB"),
        CounterDef(
            "Memory Status",
            "Hyper-V Manager's Memory Status: 0 OK, 1 Low (available memory below the buffer), "
            "2 Warning (demand above what the VM can be given)",
        ),
        CounterDef(
            "Smart Paging Working Set Size",
            "Memory of the VM backed by its Smart Paging file, not by host memory",
            "MB",
        ),
        CounterDef("Smart Paging In Use", "1 while the VM runs on its Smart Paging file, else 0"),
        CounterDef("Smart Paging File Size", "Disk the Smart Paging file holds", "MB"),
    ),
    instance_label="vm",
)


class DynamicMemoryCounters:
    """Keeps the two sets up to date. `window` is how many ticks Average/Maximum/Minimum
    Pressure look back (60 ticks = one minute at one tick a second)."""

    def __init__(self, registry: CounterRegistry, window: int = 60) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 tick, got {window}")
        self.balancer = registry.register(BALANCER_SET)
        self.vm = registry.register(VM_SET)
        self._window = window
        self._history: dict[str, deque[float]] = {}

    def record_tick(self, vms: Sequence[VmMemoryState], decision: Decision) -> None:
        """After a balancer tick: the state the decision was made on, and the decision."""
        self.balancer.update(
            {
                "Available Memory": mib_from_pages(decision.available_pages),
                "Available Memory For Balancing": mib_from_pages(
                    decision.available_for_balancing_pages
                ),
                "Average Pressure": decision.average_pressure,
                "System Current Pressure": decision.system_pressure,
            }
        )
        for state, pressure in zip(vms, decision.pressure, strict=True):
            history = self._history.get(state.vm)
            if history is None:
                history = self._history[state.vm] = deque(maxlen=self._window)
            if state.report is not None:
                history.append(pressure)
            values = {
                "Guest Visible Physical Memory": mib_from_pages(state.visible_pages),
                "Physical Memory": mib_from_pages(state.assigned_pages),
                "Guest Available Memory": mib_from_pages(
                    (state.report.available_pages or 0) if state.report else 0
                ),
                "Current Pressure": pressure,
            }
            committed = state.report.committed_pages if state.report is not None else None
            if committed is not None:
                values["Memory Demand"] = mib_from_pages(committed)
                values["Memory Status"] = HEALTH_GAUGE[
                    memory_health(
                        committed,
                        state.assigned_pages,
                        state.settings.buffer_percent,
                        state.settings.maximum_pages,
                        decision.available_pages,
                    )
                ]
            if history:
                values["Average Pressure"] = sum(history) / len(history)
                values["Maximum Pressure"] = max(history)
                values["Minimum Pressure"] = min(history)
            self.vm.update(values, state.vm)

    def record_operation(self, op: Operation) -> None:
        """After the worker carried out an operation (counts what happened, not what was asked)."""
        mb = mib_from_pages(op.pages)
        if isinstance(op, Add):
            self.vm.add("Added Memory", mb, op.vm)
            self.vm.add("Memory Add Operations", 1, op.vm)
        elif isinstance(op, Remove):
            self.vm.add("Removed Memory", mb, op.vm)
            self.vm.add("Memory Remove Operations", 1, op.vm)

    def forget_vm(self, vm: str) -> None:
        """The VM is gone: drop its instance."""
        self._history.pop(vm, None)
        self.vm.remove_instance(vm)
