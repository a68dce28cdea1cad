"""The counters a VM's worker pushes with its memory status (pyhv.dynmem.status.MemoryStatus):
the Dynamic Memory VSP's ("Hyper-V Dynamic Memory VSP", one instance per VM) and each virtual
processor's intercepts ("Hyper-V Hypervisor Virtual Processor", one instance per VP, named
"VM:Hv VP n" as Perfmon names them), and the VMMS's own count of the statuses it received and
refused ("Hyper-V VM Worker Messages": any message of pyhv.worker.messages that does not
decode, a malformed memory status among them). All are cumulative since the VM started."""

from __future__ import annotations

from pyhv.counters.registry import CounterDef, CounterRegistry, CounterSetDef
from pyhv.dynmem.status import MemoryStatus, VpCounters, VspCounters

VSP = "Hyper-V Dynamic Memory VSP"
VIRTUAL_PROCESSOR = "Hyper-V Hypervisor Virtual Processor"
MESSAGES = "Hyper-V VM Worker Messages"


def _c(name: str, help: str, unit: str = "count") -> CounterDef:
    return CounterDef(name, help, unit, "cumulative")


#: Perfmon counter name -> VspCounters field.
_VSP_FIELDS = {
    "Status Reports": "status_reports",
    "Messages Accepted": "messages_accepted",
    "Messages Refused": "messages_refused",
    "Bad Page Ranges": "bad_ranges",
    "State Transitions": "transitions",
    "Resets": "resets",
    "Transaction Timeouts": "timeouts",
    "Ballooned Pages": "ballooned_pages",
    "Unballooned Pages": "unballooned_pages",
    "Hot-Added Pages": "hot_added_pages",
    "Hot-Removed Pages": "hot_removed_pages",
    "Hot-Remove Refusals": "hot_remove_refused",
    "VMBus Doorbells": "doorbells",
    "VMBus Refused Accesses": "controller_refused",
}
_VSP_HELP = {
    "Status Reports": "DM_STATUS_REPORT messages from the guest",
    "Messages Accepted": "guest messages the VSP accepted",
    "Messages Refused": "guest messages the VSP refused (wrong state, bad values)",
    "Bad Page Ranges": "page ranges refused in the guest's balloon and hot-remove responses",
    "State Transitions": "transitions of the VSP's state machine",
    "Resets": "times the protocol started over (guest reboot, reopened channel)",
    "Transaction Timeouts": "DM transactions the guest did not answer in time",
    "Ballooned Pages": "pages the guest ballooned and the host released",
    "Unballooned Pages": "pages given back to the guest from its balloon",
    "Hot-Added Pages": "pages hot-added to the guest",
    "Hot-Removed Pages": "pages the guest gave back offline (hot-remove) and the host took",
    "Hot-Remove Refusals": "hot-remove ranges refused, and responses with no request outstanding",
    "VMBus Doorbells": "guest signals on the VMBus controller's doorbell",
    "VMBus Refused Accesses": "VMBus controller register accesses refused",
}
VSP_SET = CounterSetDef(
    VSP,
    tuple(
        _c(name, _VSP_HELP[name], "pages" if field.endswith("_pages") else "count")
        for name, field in _VSP_FIELDS.items()
    ),
    instance_label="vm",
)

#: Perfmon counter name -> VpCounters field (intercept kinds, then the handlers).
_VP_FIELDS = {
    "IO Port Intercepts": "io_port",
    "Memory Intercepts": "memory",
    "MSR Intercepts": "msr",
    "Exception Intercepts": "exception",
    "Execute Intercepts": "execute",
    "Halt Intercepts": "halt",
    "Other Intercepts": "unknown",
    "Intercepts Handled By Default": "defaulted",
    "Intercept Handler Errors": "errors",
    "Intercept Handler Time": "handler_seconds",
}
VP_SET = CounterSetDef(
    VIRTUAL_PROCESSOR,
    tuple(
        _c(
            name,
            "total time the VP's intercept handlers ran"
            if field == "handler_seconds"
            else f"intercepts of the VP ({field})",
            "seconds" if field == "handler_seconds" else "count",
        )
        for name, field in _VP_FIELDS.items()
    ),
    instance_label="vp",
)

MESSAGES_SET = CounterSetDef(
    MESSAGES,
    (
        _c("Memory Statuses", "memory statuses the VM's worker pushed and the VMMS took"),
        _c("Refused Messages", "messages from the VM's worker the VMMS refused (did not decode)"),
        _c("Messages Refused By Worker", "messages of the VMMS the VM's worker refused"),
    ),
    instance_label="vm",
)


def vp_instance(vm: str, vp: int) -> str:
    """Perfmon's instance name of a VP: "vm1:Hv VP 0"."""
    return f"{vm}:Hv VP {vp}"


class WorkerCounters:
    """Keeps the three sets up to date from the statuses the workers push."""

    def __init__(self, registry: CounterRegistry) -> None:
        self.vsp = registry.register(VSP_SET)
        self.vp = registry.register(VP_SET)
        self.messages = registry.register(MESSAGES_SET)
        self._vps: dict[str, set[str]] = {}

    def record(self, vm: str, status: MemoryStatus) -> None:
        """A status arrived from VM `vm`'s worker: its counters replace the previous ones."""
        self.messages.add("Memory Statuses", 1, vm)
        self.vsp.update(_values(_VSP_FIELDS, status.vsp), vm)
        seen = self._vps.setdefault(vm, set())
        for vp in status.vps:
            instance = vp_instance(vm, vp.vp)
            seen.add(instance)
            self.vp.update(_values(_VP_FIELDS, vp), instance)

    def refused(self, vm: str) -> None:
        """A message from VM `vm`'s worker did not decode."""
        self.messages.add("Refused Messages", 1, vm)

    def refused_by_worker(self, vm: str) -> None:
        """VM `vm`'s worker refused a message of the VMMS (it said so)."""
        self.messages.add("Messages Refused By Worker", 1, vm)

    def forget_vm(self, vm: str) -> None:
        """The VM is gone: drop its instances."""
        self.vsp.remove_instance(vm)
        self.messages.remove_instance(vm)
        for instance in self._vps.pop(vm, set()):
            self.vp.remove_instance(instance)


def _values(names: dict[str, str], counters: VspCounters | VpCounters) -> dict[str, float]:
    return {name: getattr(counters, field) for name, field in names.items()}
