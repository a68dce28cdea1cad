"""pyhv.kvm: the typed binding of Linux KVM. The only module that knows ioctl numbers and C structs.

- `Kvm` (/dev/kvm), `Vm`, `Vcpu`: one method per ioctl, errors raised as `KvmError`.
- `structs`: the ctypes layouts; `constants`: ioctl numbers, capabilities, exit reasons, flags.
- `exits`: one dataclass per KVM_EXIT_* kind and `RunPage`, the fast reader of kvm_run.
"""

from pyhv.kvm import constants, structs
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
    RunPage,
    ShutdownExit,
    SystemEventExit,
    UnknownExit,
)
from pyhv.kvm.fds import Kvm, KvmError, Vcpu, Vm, address_of

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
