"""Intercepts: what the hypervisor hands to the root when a guest does something the root owns.

Each message mirrors a Hyper-V HV_X64_*_INTERCEPT_MESSAGE (reference/intercepts.md): the common
header (vp_index, access type, instruction length, CS, RIP, RFLAGS) plus the fields of its kind.
The VP stays suspended while the handler runs ("intercept suspend") and resumes with whatever
registers and memory the handler set.

A message object is reused for the next intercept of the same VP: read what you need during the
handler and do not keep the object. RIP, RFLAGS, CS and the registers are fetched from KVM only if
the handler asks for them.

Under KVM some header fields are unknown to user space: `instruction_length` is None.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pyhv.kvm import constants as c
from pyhv.kvm import structs as ks
from pyhv.kvm.loopabi import (
    KIND_IO,
    KIND_MEMORY,
    KIND_MSR,
    GpaRoute,
    IoAccess,
    MmioAccess,
    MsrAccess,
    Route,
    Routes,
)

if TYPE_CHECKING:
    from pyhv.hypervisor.partition import Partition
    from pyhv.hypervisor.registers import Registers, Segment, SpecialRegisters
    from pyhv.hypervisor.vp import VirtualProcessor


class AccessType(enum.IntEnum):
    """HV_INTERCEPT_ACCESS_TYPE."""

    READ = 0
    WRITE = 1
    EXECUTE = 2


class InterceptKind(enum.IntEnum):
    """What a counter counts; also indexes the per-VP counter arrays."""

    IO_PORT = KIND_IO  # the first three as the C run loop counts them
    MEMORY = KIND_MEMORY
    MSR = KIND_MSR
    EXCEPTION = 3
    EXECUTE = 4
    HALT = 5
    UNKNOWN = 6


KIND_COUNT = len(InterceptKind)


class InterceptError(ValueError):
    """An intercept could not be installed as asked."""


class InterceptMessage:
    """The header every intercept message shares (HV_X64_INTERCEPT_MESSAGE_HEADER): `vp`,
    `vp_index` and `access_type`, declared by each message (the I/O, memory and MSR messages
    keep their fields where the C run loop writes them: pyhv.kvm.loopabi)."""

    __slots__ = ()
    vp: VirtualProcessor
    vp_index: int
    access_type: AccessType
    instruction_length: ClassVar[int | None] = None  # KVM does not report it
    kind: ClassVar[InterceptKind]

    # Lazily fetched VP state: only an ioctl if the handler asks.
    @property
    def registers(self) -> Registers:
        return self.vp.registers

    def set_registers(self, **values: int) -> None:
        """Change registers (e.g. rax=1, rip=...): applied before the VP resumes."""
        self.vp.update_registers(**values)

    @property
    def special_registers(self) -> SpecialRegisters:
        return self.vp.special_registers

    @property
    def rip(self) -> int:
        return self.vp.registers.rip

    @property
    def rflags(self) -> int:
        return self.vp.registers.rflags

    @property
    def cs(self) -> Segment:
        return self.vp.special_registers.cs

    @property
    def cpl(self) -> int:
        return self.vp.special_registers.cs.dpl

    @property
    def partition(self) -> Partition:
        return self.vp.partition


@dataclass(slots=True, eq=False)
class IoPortIntercept(InterceptMessage, IoAccess):
    """HV_X64_IO_PORT_INTERCEPT_MESSAGE: IN/OUT/INS/OUTS to an intercepted port.

    For a write, `value` is the first element and `data` all `count` elements (strings).
    For a read the handler returns an int (used for each element) or `count * access_size` bytes.
    """

    vp: VirtualProcessor = field(repr=False)
    vp_index: int = 0
    access_type: AccessType = AccessType.READ
    port: int = 0
    access_size: int = 1
    count: int = 1
    value: int = 0
    _data: bytes = field(default=b"", repr=False)
    kind: ClassVar[InterceptKind] = InterceptKind.IO_PORT

    @property
    def is_write(self) -> bool:
        return self.access_type == AccessType.WRITE

    @property
    def string_op(self) -> bool:
        return self.count > 1

    @property
    def data(self) -> bytes:
        """All bytes written (count x access_size); for a read, empty."""
        if self.access_type != AccessType.WRITE:
            return b""
        if self.count > 1:
            return self._data
        return self.value.to_bytes(self.access_size, "little")


@dataclass(slots=True, eq=False)
class MemoryIntercept(InterceptMessage, MmioAccess):
    """HV_X64_MEMORY_INTERCEPT_MESSAGE: access to an intercepted GPA (no RAM, or read-only RAM).

    For a write, `value` and `data` are what the guest wrote and the write is done when the
    handler returns: KVM cannot re-execute the instruction, so a handler that wants the write to
    land in memory (e.g. after giving the writer its own copy) writes `data` there itself.
    For a read the handler returns the value. EXECUTE messages (hardware breakpoints) carry the
    `gva` and the translated `gpa` (-1 if the guest's page tables do not map it).
    """

    vp: VirtualProcessor = field(repr=False)
    vp_index: int = 0
    access_type: AccessType = AccessType.READ
    gpa: int = 0
    gva: int | None = None
    access_size: int = 0
    value: int = 0
    kind: ClassVar[InterceptKind] = InterceptKind.MEMORY
    cache_type: ClassVar[int] = 6  # WB: KVM does not say

    @property
    def is_write(self) -> bool:
        return self.access_type == AccessType.WRITE

    @property
    def data(self) -> bytes:
        """The bytes written; for a read or execute, empty."""
        if self.access_type != AccessType.WRITE:
            return b""
        return self.value.to_bytes(self.access_size, "little")


@dataclass(slots=True, eq=False)
class MsrIntercept(InterceptMessage, MsrAccess):
    """HV_X64_MSR_INTERCEPT_MESSAGE: RDMSR/WRMSR of an intercepted MSR.

    A read handler returns the 64-bit value; either handler may call `inject_gp()` instead.
    """

    vp: VirtualProcessor = field(repr=False)
    vp_index: int = 0
    access_type: AccessType = AccessType.READ
    msr: int = 0
    value: int = 0
    gp: bool = False
    kind: ClassVar[InterceptKind] = InterceptKind.MSR

    @property
    def is_write(self) -> bool:
        return self.access_type == AccessType.WRITE

    @property
    def rax(self) -> int:
        return self.value & 0xFFFFFFFF

    @property
    def rdx(self) -> int:
        return self.value >> 32

    def inject_gp(self) -> None:
        """Fail the access with #GP(0), as the CPU does for an MSR that does not exist."""
        self.gp = True


@dataclass(slots=True, eq=False)
class ExceptionIntercept(InterceptMessage):
    """HV_X64_EXCEPTION_INTERCEPT_MESSAGE for #DB (1) and #BP (3), the vectors KVM can give."""

    vp: VirtualProcessor = field(repr=False)
    vp_index: int = 0
    access_type: AccessType = AccessType.EXECUTE
    exception_vector: int = 0
    pc: int = 0
    dr6: int = 0
    dr7: int = 0
    kind: ClassVar[InterceptKind] = InterceptKind.EXCEPTION
    error_code: ClassVar[int | None] = None


@dataclass(slots=True, eq=False)
class HaltIntercept(InterceptMessage):
    """HV_X64_HALT_MESSAGE: the VP executed HLT (header only)."""

    vp: VirtualProcessor = field(repr=False)
    vp_index: int = 0
    access_type: AccessType = AccessType.READ

    kind: ClassVar[InterceptKind] = InterceptKind.HALT


Handler = Callable[[Any], Any]


@dataclass(eq=False)
class InterceptHandle:
    """What install_* returns; `uninstall()` removes the intercept."""

    kind: InterceptKind
    description: str
    _remove: Callable[[], None]
    installed: bool = True

    def uninstall(self) -> None:
        if self.installed:
            self.installed = False
            self._remove()


class _Entry(Route):
    """An installed intercept: where its exits go (a `Route` the run loops read) and its handle.
    `plain` is the handler as installed; `handler` is it or its traced wrapper."""

    __slots__ = ("handle", "plain")

    def __init__(
        self, handler: Handler, read: bool, write: bool, handle: InterceptHandle | None = None
    ) -> None:
        super().__init__(handler, read, write)
        self.handle = handle
        self.plain = handler


class _GpaEntry(GpaRoute):
    """An installed GPA intercept: the range [start, end) and its handle."""

    __slots__ = ("handle", "plain")

    def __init__(self, handler: Handler, read: bool, write: bool, start: int, end: int) -> None:
        super().__init__(handler, read, write, start, end)
        self.handle: InterceptHandle | None = None
        self.plain = handler


EXCEPTION_VECTORS = {1: "#DB", 3: "#BP"}
# Ports KVM_CREATE_IRQCHIP handles in the kernel (8259 pair and its ELCR).
KERNEL_PORTS = (
    (0x20, 0x21, "master 8259 PIC"),
    (0xA0, 0xA1, "slave 8259 PIC"),
    (0x4D0, 0x4D1, "8259 ELCR"),
)
MAX_HW_BREAKPOINTS = 4
#: The intercept kinds the flight recorder can trace (set_tracer).
_TRACEABLE = frozenset((InterceptKind.IO_PORT, InterceptKind.MEMORY, InterceptKind.MSR))
MSR_FILTER_SPAN = ks.MSR_FILTER_MAX_BITMAP_BYTES * 8


class InterceptTable(Routes):
    """The intercepts installed in one partition (HvInstallIntercept), read by its VP threads.

    Tables are replaced, never mutated in place, so a VP thread always sees a consistent one.
    `io`, `gpa`, `gpa_starts` and `msr` are the `Routes` the run loops (C and Python) read.
    The one change in place is an entry's `handler`, swapped whole (one reference) when the
    flight recorder attaches or leaves (`set_tracer`): the loops take it once per exit.
    """

    __slots__ = ("_partition", "_lock", "_tracer", "_traced", "exception", "execute", "halt")

    def __init__(self, partition: Partition) -> None:
        super().__init__()
        self._partition = partition
        self._lock = threading.Lock()
        self.io: list[_Entry | None] = [None] * 0x10000
        self.gpa: tuple[_GpaEntry, ...] = ()
        self.gpa_starts: tuple[int, ...] = ()
        self.msr: dict[int, _Entry] = {}
        self.exception: dict[int, _Entry] = {}
        self.execute: dict[int, _Entry] = {}  # gva -> entry (hardware execute breakpoints)
        self.halt: _Entry | None = None
        self._tracer: Callable[[Any], object] | None = None
        self._traced: frozenset[InterceptKind] = _TRACEABLE

    # ---------------------------------------------------------------- the flight recorder
    def set_tracer(
        self, record: Callable[[Any], object] | None, kinds: Iterable[InterceptKind] | None = None
    ) -> None:
        """Send every handled intercept of `kinds` (I/O port, memory, MSR; None: all three) to
        `record` as a typed event (pyhv.trace.events), or, with None, stop. Nothing on the exit
        path tests whether tracing is on: the handlers themselves are swapped for traced ones
        and back."""
        with self._lock:
            self._tracer = record
            self._traced = frozenset(_TRACEABLE if kinds is None else kinds) & _TRACEABLE
            for e in {id(e): e for e in self.io if e is not None}.values():
                self._trace_entry(e, InterceptKind.IO_PORT)
            for g in self.gpa:
                self._trace_entry(g, InterceptKind.MEMORY)
            for e in {id(e): e for e in self.msr.values()}.values():
                self._trace_entry(e, InterceptKind.MSR)

    def _trace_entry(self, entry: _Entry | _GpaEntry, kind: InterceptKind) -> None:
        from pyhv.hypervisor import tracing

        record = self._tracer
        if record is None or kind not in self._traced:
            entry.handler = entry.plain
            return
        wrap = {
            InterceptKind.IO_PORT: tracing.traced_io,
            InterceptKind.MEMORY: tracing.traced_mmio,
            InterceptKind.MSR: tracing.traced_msr,
        }[kind]
        entry.handler = wrap(entry.plain, record)

    # ---------------------------------------------------------------- I/O ports
    def install_io(
        self,
        first_port: int,
        last_port: int,
        handler: Handler,
        read: bool = True,
        write: bool = True,
    ) -> InterceptHandle:
        if not (0 <= first_port <= last_port <= 0xFFFF):
            raise InterceptError(
                f"port range {first_port:#x}-{last_port:#x} is invalid: need 0 <= first <= last <= 0xffff"
            )
        if not (read or write):
            raise InterceptError("an I/O intercept needs read=True or write=True")
        if self._partition.irqchip:
            for lo, hi, what in KERNEL_PORTS:
                if first_port <= hi and lo <= last_port:
                    raise InterceptError(
                        f"ports {lo:#x}-{hi:#x} belong to the in-kernel {what} and never reach "
                        "user space: choose other ports"
                    )
        with self._lock:
            busy = [p for p in range(first_port, last_port + 1) if self.io[p] is not None]
            if busy:
                raise InterceptError(
                    f"port {busy[0]:#x} already has an intercept: uninstall it first"
                )
            entry = _Entry(handler, read, write)
            if self._tracer is not None:
                self._trace_entry(entry, InterceptKind.IO_PORT)
            table = list(self.io)
            for p in range(first_port, last_port + 1):
                table[p] = entry
            self.io = table

        def remove() -> None:
            with self._lock:
                t = list(self.io)
                for p in range(first_port, last_port + 1):
                    if t[p] is entry:
                        t[p] = None
                self.io = t

        entry.handle = InterceptHandle(
            InterceptKind.IO_PORT, f"ports {first_port:#x}-{last_port:#x}", remove
        )
        return entry.handle

    # ---------------------------------------------------------------- GPA ranges
    def install_gpa(
        self, gpa: int, size: int, handler: Handler, read: bool = True, write: bool = True
    ) -> InterceptHandle:
        """Intercept accesses to [gpa, gpa+size): ranges with no RAM exit on read and write,
        read-only RAM exits on write."""
        if size <= 0 or gpa < 0 or gpa + size > self._partition.max_gpa:
            raise InterceptError(
                f"GPA range {gpa:#x}+{size:#x} is invalid: size must be > 0 and the range inside "
                f"0-{self._partition.max_gpa:#x}"
            )
        for r in self._partition.regions:
            if r.gpa < gpa + size and gpa < r.end and not r.readonly:
                raise InterceptError(
                    f"GPA range {gpa:#x}+{size:#x} overlaps writable RAM at {r.gpa:#x}-{r.end:#x}, "
                    "whose accesses never leave the guest: make that region read-only or remove it"
                )
        with self._lock:
            for e in self.gpa:
                if e.start < gpa + size and gpa < e.end:
                    raise InterceptError(
                        f"GPA range {gpa:#x}+{size:#x} overlaps the intercept at "
                        f"{e.start:#x}-{e.end:#x}: uninstall it first"
                    )
            entry = _GpaEntry(handler, read, write, gpa, gpa + size)
            if self._tracer is not None:
                self._trace_entry(entry, InterceptKind.MEMORY)
            self._set_gpa(sorted([*self.gpa, entry], key=lambda e: e.start))

        def remove() -> None:
            with self._lock:
                self._set_gpa([e for e in self.gpa if e is not entry])

        entry.handle = InterceptHandle(InterceptKind.MEMORY, f"GPA {gpa:#x}+{size:#x}", remove)
        return entry.handle

    def _set_gpa(self, entries: list[_GpaEntry]) -> None:
        self.gpa, self.gpa_starts = tuple(entries), tuple(e.start for e in entries)

    # ---------------------------------------------------------------- MSRs
    def install_msr(
        self, msrs: Iterable[int] | int, handler: Handler, read: bool = True, write: bool = True
    ) -> InterceptHandle:
        indices = sorted({msrs} if isinstance(msrs, int) else set(msrs))
        if not indices or any(not 0 <= m <= 0xFFFFFFFF for m in indices):
            raise InterceptError(
                f"MSR indices {indices[:4]} must be 1 or more values in 0-0xffffffff"
            )
        if not (read or write):
            raise InterceptError("an MSR intercept needs read=True or write=True")
        with self._lock:
            busy = [m for m in indices if m in self.msr]
            if busy:
                raise InterceptError(
                    f"MSR {busy[0]:#x} already has an intercept: uninstall it first"
                )
            entry = _Entry(handler, read, write)
            if self._tracer is not None:
                self._trace_entry(entry, InterceptKind.MSR)
            table = dict(self.msr)
            table.update({m: entry for m in indices})
            self._apply_msr_filter(table)  # raises (table unchanged) if it cannot be expressed
            self.msr = table

        def remove() -> None:
            with self._lock:
                t = {m: e for m, e in self.msr.items() if e is not entry}
                self._apply_msr_filter(t)
                self.msr = t

        entry.handle = InterceptHandle(
            InterceptKind.MSR, f"MSRs {', '.join(hex(m) for m in indices[:4])}", remove
        )
        return entry.handle

    def _apply_msr_filter(self, table: dict[int, _Entry]) -> None:
        """KVM_X86_SET_MSR_FILTER: deny (= send to user space) the intercepted accesses."""
        ranges: list[tuple[int, int, list[int]]] = []  # (flag, base, msrs)
        for flag, wanted in (
            (c.MSR_FILTER_READ, sorted(m for m, e in table.items() if e.read)),
            (c.MSR_FILTER_WRITE, sorted(m for m, e in table.items() if e.write)),
        ):
            for m in wanted:
                if ranges and ranges[-1][0] == flag and m - ranges[-1][1] < MSR_FILTER_SPAN:
                    ranges[-1][2].append(m)
                else:
                    ranges.append((flag, m, [m]))
        if len(ranges) > ks.MSR_FILTER_MAX_RANGES:
            raise InterceptError(
                f"these MSRs need {len(ranges)} filter ranges, KVM allows "
                f"{ks.MSR_FILTER_MAX_RANGES}: intercept MSRs that lie closer together"
            )
        f = ks.kvm_msr_filter(flags=c.MSR_FILTER_DEFAULT_ALLOW)
        keep = []
        for i, (flag, base, members) in enumerate(ranges):
            n = members[-1] - base + 1
            bitmap = bytearray(b"\xff" * ((n + 7) // 8))  # 1 = allow
            for m in members:
                bitmap[(m - base) // 8] &= ~(1 << ((m - base) % 8)) & 0xFF
            buf = (ks.u8 * len(bitmap)).from_buffer(bitmap)
            keep.append((bitmap, buf))
            f.ranges[i].flags = flag
            f.ranges[i].nmsrs = n
            f.ranges[i].base = base
            f.ranges[i].bitmap = ks.ctypes.addressof(buf)
        self._partition.vm.set_msr_filter(f)
        del keep

    # ---------------------------------------------------------------- exceptions, execute, halt
    def install_exception(self, vector: int, handler: Handler) -> InterceptHandle:
        """#DB (1) or #BP (3): the vectors KVM reports to user space (through guest debugging)."""
        if vector not in EXCEPTION_VECTORS:
            raise InterceptError(
                f"exception vector {vector} cannot be intercepted under KVM: only #DB (1) and "
                "#BP (3) reach user space (reference/intercepts.md, 'Gaps vs Hyper-V')"
            )
        with self._lock:
            if vector in self.exception:
                raise InterceptError(
                    f"vector {vector} already has an intercept: uninstall it first"
                )
            entry = _Entry(handler, True, True)
            self.exception = {**self.exception, vector: entry}
        self._partition._update_guest_debug()

        def remove() -> None:
            with self._lock:
                self.exception = {v: e for v, e in self.exception.items() if e is not entry}
            self._partition._update_guest_debug()

        entry.handle = InterceptHandle(
            InterceptKind.EXCEPTION, f"vector {vector} {EXCEPTION_VECTORS[vector]}", remove
        )
        return entry.handle

    def install_execute(self, gva: int, handler: Handler) -> InterceptHandle:
        """Execute intercept at a guest virtual address, by a hardware breakpoint (at most 4)."""
        if not 0 <= gva < 1 << 64:
            raise InterceptError(f"GVA {gva:#x} is not a 64-bit address")
        with self._lock:
            if gva in self.execute:
                raise InterceptError(f"GVA {gva:#x} already has an execute intercept")
            if len(self.execute) >= MAX_HW_BREAKPOINTS:
                raise InterceptError(
                    f"all {MAX_HW_BREAKPOINTS} hardware breakpoints (DR0-DR3) are in use: "
                    "uninstall an execute intercept first"
                )
            entry = _Entry(handler, False, False)
            self.execute = {**self.execute, gva: entry}
        self._partition._update_guest_debug()

        def remove() -> None:
            with self._lock:
                self.execute = {g: e for g, e in self.execute.items() if e is not entry}
            self._partition._update_guest_debug()

        entry.handle = InterceptHandle(InterceptKind.EXECUTE, f"execute at GVA {gva:#x}", remove)
        return entry.handle

    def install_halt(self, handler: Handler) -> InterceptHandle:
        with self._lock:
            if self.halt is not None:
                raise InterceptError("a halt intercept is already installed: uninstall it first")
            entry = _Entry(handler, True, True)
            self.halt = entry

        def remove() -> None:
            with self._lock:
                if self.halt is entry:
                    self.halt = None

        entry.handle = InterceptHandle(InterceptKind.HALT, "HLT", remove)
        return entry.handle

    def guest_debug_control(self) -> tuple[int, list[int]]:
        """KVM_SET_GUEST_DEBUG control and debug registers for the installed intercepts."""
        control = 0
        dr = [0] * 8
        if self.execute:
            control |= c.GUESTDBG_ENABLE | c.GUESTDBG_USE_HW_BP
            dr7 = 0x400
            for i, gva in enumerate(sorted(self.execute)):
                dr[i] = gva
                dr7 |= 1 << (2 * i + 1)  # G bit; RW=00 (execute), LEN=00
            dr[7] = dr7
        if 3 in self.exception:
            control |= c.GUESTDBG_ENABLE | c.GUESTDBG_USE_SW_BP
        if 1 in self.exception:
            control |= c.GUESTDBG_ENABLE | c.GUESTDBG_SINGLESTEP
        return control, dr
