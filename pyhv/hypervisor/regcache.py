"""A VP's register cache for the length of one intercept.

A handler's first read of the registers costs an ioctl; the rest of that intercept reads the
cache, and what the handler changed is written back once, after KVM has completed the
intercepted access (`_flush_exit_changes`). `_touched` (a flag the C run loop reads, declared in
pyhv.kvm.loopabi) tells the loop there is something to write back.
"""

from __future__ import annotations

import fcntl

from pyhv.hypervisor.registers import Registers, SpecialRegisters, changed_fields
from pyhv.kvm import Vcpu
from pyhv.kvm import constants as c
from pyhv.kvm import runpage as rp
from pyhv.kvm.loopabi import LoopOwner

GPR_FIELDS = tuple(Registers.__dataclass_fields__)


class RegisterCache(LoopOwner):
    """The registers of a vCPU as its intercept handlers see them (VP thread only)."""

    def __init__(self, vcpu: Vcpu) -> None:
        super().__init__()
        self.vcpu = vcpu
        self.index = vcpu.index
        self._regs: Registers | None = None
        self._regs_before: Registers | None = None
        self._sregs: SpecialRegisters | None = None
        self._sregs_dirty = False
        self._pending_exit = False  # a new exit is already in kvm_run (found while completing)

    def _cached_registers(self) -> Registers:
        if self._regs is None:
            self._regs = Registers.from_kvm(self.vcpu.get_regs())
            self._touched = True
            self._regs_before = Registers(*(getattr(self._regs, n) for n in GPR_FIELDS))
        return Registers(*(getattr(self._regs, n) for n in GPR_FIELDS))

    def _set_cached_registers(self, value: Registers) -> None:
        self._cached_registers()  # makes sure the snapshot exists
        self._regs = Registers(*(getattr(value, n) for n in GPR_FIELDS))

    def _cached_special_registers(self) -> SpecialRegisters:
        if self._sregs is None:
            self._sregs = SpecialRegisters.from_kvm(self.vcpu.get_sregs())
            self._touched = True
        return self._sregs

    def _set_cached_special_registers(self, value: SpecialRegisters) -> None:
        self._sregs = value
        self._sregs_dirty = True
        self._touched = True

    def _flush_exit_changes(self) -> None:
        """Write back what a handler changed, after KVM has completed the intercepted access."""
        regs, before = self._regs, self._regs_before
        changes = changed_fields(before, regs) if regs is not None and before is not None else {}
        if changes or self._sregs_dirty:
            self._complete_pending_access()
            if self._sregs_dirty and self._sregs is not None:
                self.vcpu.set_sregs(self._sregs.to_kvm())
            if changes:
                k = self.vcpu.get_regs()
                for n, v in changes.items():
                    setattr(k, n, v)
                self.vcpu.set_regs(k)
        self._regs = self._regs_before = self._sregs = None
        self._sregs_dirty = False
        self._touched = False

    def _complete_pending_access(self) -> None:
        """Let KVM finish the intercepted instruction (IN data into RAX, RIP past it) without
        running the guest: KVM_RUN with immediate_exit returns EINTR once that is done. If the
        instruction needs another exit (a string I/O), that exit is handled next."""
        b = self.vcpu.run_page.b
        b[rp.IMMEDIATE_EXIT] = 1
        try:
            fcntl.ioctl(self.vcpu.fd, c.KVM_RUN, 0)
            self._pending_exit = True
            self._attention = True
        except InterruptedError:
            pass
        finally:
            b[rp.IMMEDIATE_EXIT] = 0
