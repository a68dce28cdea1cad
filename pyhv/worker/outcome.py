"""How a VM ended, as the worker reports it to its owner (the console or the VMMS)."""

from __future__ import annotations

from dataclasses import dataclass, field

POWEROFF = "poweroff"  # the guest wrote its exit status to port 0xF4
TRIPLE_FAULT = "triple_fault"  # the VP shut down (KVM_EXIT_SHUTDOWN)
EMULATION_ERROR = "emulation_error"  # KVM could not emulate or enter the guest
STOPPED = "stopped"  # the owner stopped the VM
WORKER_ERROR = "worker_error"  # the worker itself failed (a bug or a lost host resource)

REASONS = (POWEROFF, TRIPLE_FAULT, EMULATION_ERROR, STOPPED, WORKER_ERROR)

# Process exit codes of `pyhv run` for endings that carry no guest status.
EXIT_TRIPLE_FAULT = 3
EXIT_EMULATION_ERROR = 4
EXIT_WORKER_ERROR = 5

_REG_ORDER = (
    "rip rsp rbp rflags rax rbx rcx rdx rsi rdi r8 r9 r10 r11 r12 r13 r14 r15 "
    "cr0 cr2 cr3 cr4 efer cs ss"
).split()


@dataclass(frozen=True)
class VmEnd:
    reason: str
    status: int | None = None
    vp: int | None = None
    registers: dict[str, int] = field(default_factory=dict)
    detail: str = ""

    @property
    def exit_code(self) -> int:
        """What `pyhv run` exits with: the guest's status, 0 when stopped, else a fault code."""
        if self.reason == POWEROFF:
            return (self.status or 0) & 0xFF
        if self.reason == STOPPED:
            return 0
        if self.reason == TRIPLE_FAULT:
            return EXIT_TRIPLE_FAULT
        if self.reason == EMULATION_ERROR:
            return EXIT_EMULATION_ERROR
        return EXIT_WORKER_ERROR

    @property
    def failed(self) -> bool:
        return self.reason not in (POWEROFF, STOPPED)

    def describe(self) -> str:
        """A human report: one line, plus the registers for a fault."""
        if self.reason == POWEROFF:
            head = f"guest powered off with status {self.status}"
        elif self.reason == STOPPED:
            head = "VM stopped" + (f" ({self.detail})" if self.detail else "")
        elif self.reason == TRIPLE_FAULT:
            head = f"guest triple-faulted on VP {self.vp} (the VP shut down)"
        elif self.reason == EMULATION_ERROR:
            head = f"KVM could not run VP {self.vp}: {self.detail}"
        else:
            head = f"the worker failed: {self.detail}"
        return head + ("\n" + format_registers(self.registers) if self.registers else "")

    def to_dict(self) -> dict[str, object]:
        return {
            "reason": self.reason,
            "status": self.status,
            "vp": self.vp,
            "registers": dict(self.registers),
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> VmEnd:
        reason = str(d.get("reason"))
        if reason not in REASONS:
            raise ValueError(f"unknown VM end reason {reason!r}: expected one of {REASONS}")
        regs = d.get("registers") or {}
        status = d.get("status")
        vp = d.get("vp")
        return cls(
            reason=reason,
            status=int(status) if isinstance(status, int) else None,
            vp=int(vp) if isinstance(vp, int) else None,
            registers={str(k): int(v) for k, v in dict(regs).items()},  # type: ignore[call-overload]
            detail=str(d.get("detail", "")),
        )


def format_registers(regs: dict[str, int]) -> str:
    names = [n for n in _REG_ORDER if n in regs] + sorted(set(regs) - set(_REG_ORDER))
    cells = [f"{n.upper():>6}={regs[n]:016x}" for n in names]
    return "\n".join("  ".join(cells[i : i + 3]) for i in range(0, len(cells), 3))
