"""pyhv.kvm: the typed binding of Linux KVM. The only module that knows ioctl numbers and C structs.

- `Kvm` (/dev/kvm), `Vm`, `Vcpu`: one method per ioctl, errors raised as `KvmError`.
- `structs`: the ctypes layouts; `constants`: ioctl numbers, capabilities, exit reasons, flags.
- `exits`: one dataclass per KVM_EXIT_* kind (imported on first use); `runpage.RunPage`, the fast
  reader of kvm_run (and the index of each field it reads); `fastrun`, the VP run loop in C, and
  `loopabi`, the structures it reads, which the layer above fills.
"""

from typing import TYPE_CHECKING

from pyhv.kvm import constants, structs
from pyhv.kvm.fds import Kvm, KvmError, Vcpu, Vm, address_of
from pyhv.kvm.runpage import RunPage

if TYPE_CHECKING:
    from pyhv.kvm.exits import (
        DebugExit,
        Exit,
        FailEntryExit,
        HltExit,
        InternalErrorExit,
        IntrExit,
        IoExit,
        MmioExit,
        MsrExit,
        ShutdownExit,
        SystemEventExit,
        UnknownExit,
    )

_EXITS = {
    "DebugExit",
    "Exit",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "IntrExit",
    "IoExit",
    "MmioExit",
    "MsrExit",
    "ShutdownExit",
    "SystemEventExit",
    "UnknownExit",
}


def __getattr__(name: str) -> object:
    # the exit classes are imported when first asked for: a VM's start does not need them
    if name in _EXITS:
        from pyhv.kvm import exits

        return getattr(exits, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DebugExit",
    "Exit",
    "FailEntryExit",
    "HltExit",
    "InternalErrorExit",
    "IntrExit",
    "IoExit",
    "Kvm",
    "KvmError",
    "MmioExit",
    "MsrExit",
    "RunPage",
    "ShutdownExit",
    "SystemEventExit",
    "UnknownExit",
    "Vcpu",
    "Vm",
    "address_of",
    "constants",
    "structs",
]
