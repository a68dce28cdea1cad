"""pyhv.hypervisor: partitions, virtual processors, the GPA space and intercepts, over pyhv.kvm.

Public surface (see docs/hypervisor.md)::

    from pyhv.hypervisor import Partition, VirtualProcessor, Registers, SpecialRegisters, Segment
    p = Partition(name="vm1")                 # KVM VM with the in-kernel irqchip (time_handlers=True)
    r = p.add_memory(gpa, size, readonly=False, track_dirty=False)  # memfd RAM; r.memfd, r.host_address
    p.remove_memory(r); p.read(gpa, n); p.write(gpa, data); p.view(gpa, n); p.translate(cr3, gva)
    r.dirty_pages()                           # GPAs written since the last call
    p.irq_line(pin, level); p.pulse_irq(pin); p.signal_msi(addr, data); p.interrupt(vp, vector)
    p.irqfd(gsi) -> fd; p.msi_irqfd(vp, vector) -> fd
    p.ioeventfd(port_or_gpa, length, fd=None, datamatch=None, mmio=False) -> IoEventFd
    vp = p.create_vp(0); vp.registers; vp.special_registers; vp.update_registers(rax=1)
    enter_long_mode(p, vp, rip, rsp, cpl=0)   # page tables, GDT, SREGS; vp.make_runnable() for APs
    vp.start(); vp.pause(); vp.resume(); vp.stop(); vp.wait(timeout) -> VpEvent | None
    p.intercepts.install_io(first, last, handler, read=True, write=True) -> handle; handle.uninstall()
    p.intercepts.install_gpa(gpa, size, handler, ...); install_msr(msrs, handler, ...)
    p.intercepts.install_exception(1 or 3, handler); install_execute(gva, handler); install_halt(handler)
    p.counters                                # per intercept kind: count, defaulted, errors, seconds
    p.save() -> PartitionState; p.restore(state); Partition.from_state(state) (pyhv.hypervisor.state)
    p.close()

Handlers get a message (IoPortIntercept, MemoryIntercept, MsrIntercept, ExceptionIntercept,
HaltIntercept) and run on the VP's thread while the VP is suspended; a read handler returns the
value. See pyhv.hypervisor.intercepts for the fields.
"""

from typing import TYPE_CHECKING

from pyhv.hypervisor.intercepts import (
    AccessType,
    ExceptionIntercept,
    HaltIntercept,
    InterceptError,
    InterceptHandle,
    InterceptKind,
    IoPortIntercept,
    MemoryIntercept,
    MsrIntercept,
)
from pyhv.hypervisor.longmode import enter_long_mode
from pyhv.hypervisor.memory import GpaError, MemoryRegion
from pyhv.hypervisor.pagetables import TranslationError
from pyhv.hypervisor.partition import IoEventFd, Partition
from pyhv.hypervisor.registers import DescriptorTable, Registers, Segment, SpecialRegisters
from pyhv.hypervisor.vp import (
    VirtualProcessor,
    VpEvent,
    VpEventKind,
    VpState,
    install_kick_handler,
)

if TYPE_CHECKING:
    from pyhv.hypervisor.state import PartitionState, StateError


def __getattr__(name: str) -> object:
    # save/restore (pyhv.hypervisor.state) is imported when first asked for, not at boot
    if name in ("PartitionState", "StateError"):
        from pyhv.hypervisor import state

        return getattr(state, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AccessType",
    "DescriptorTable",
    "ExceptionIntercept",
    "GpaError",
    "HaltIntercept",
    "InterceptError",
    "InterceptHandle",
    "InterceptKind",
    "IoEventFd",
    "IoPortIntercept",
    "MemoryIntercept",
    "MemoryRegion",
    "MsrIntercept",
    "Partition",
    "PartitionState",
    "Registers",
    "Segment",
    "SpecialRegisters",
    "StateError",
    "TranslationError",
    "VirtualProcessor",
    "VpEvent",
    "VpEventKind",
    "VpState",
    "enter_long_mode",
    "install_kick_handler",
]
