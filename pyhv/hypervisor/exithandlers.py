"""A VP's exit handling off the hot path: each kind of exit becomes its intercept message for the
installed handler, or gets its default treatment (open bus, #GP, stop), counted either way.

The run loop (pyhv.hypervisor.runloop) handles port I/O and RDMSR inline and calls these for the
other kinds; the C loop calls `_handler_failed` and `_fill_io_read` back. A handler that raises
ends the VP thread with an ERROR event (`_handler_failed` makes the `VpStopped` for it).
"""

from __future__ import annotations

import bisect
import logging
import time
from array import array
from typing import TYPE_CHECKING, Any

from pyhv.hypervisor.intercepts import (
    KIND_COUNT,
    AccessType,
    ExceptionIntercept,
    HaltIntercept,
    InterceptKind,
    IoPortIntercept,
    MemoryIntercept,
    MsrIntercept,
)
from pyhv.hypervisor.regcache import RegisterCache
from pyhv.hypervisor.registers import Registers, SpecialRegisters
from pyhv.hypervisor.vpevents import VpEvent, VpEventKind, VpStopped
from pyhv.kvm import KvmError, Vcpu
from pyhv.kvm import constants as c
from pyhv.kvm import runpage as rp

if TYPE_CHECKING:
    from pyhv.hypervisor.intercepts import InterceptTable
    from pyhv.hypervisor.partition import Partition

log = logging.getLogger("pyhv.hypervisor.vp")

IO, MEM, MSR, EXC, EXE, HLT, UNK = (int(k) for k in InterceptKind)
MASK64 = 0xFFFFFFFFFFFFFFFF
SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: MASK64}


class ExitHandlers(RegisterCache):
    """The exit handlers of one VP, its intercept counters and its reused messages."""

    def __init__(self, partition: Partition, vcpu: Vcpu) -> None:
        super().__init__(vcpu)
        self.partition = partition
        self._clock: Any = time.perf_counter_ns
        self._stepping_over = False  # single-stepping over an execute breakpoint
        # counters, indexed by InterceptKind (arrays of int64: the C loop adds to them in place)
        self.counts = array("q", bytes(8 * KIND_COUNT))
        self.defaults = array("q", bytes(8 * KIND_COUNT))
        self.errors = array("q", bytes(8 * KIND_COUNT))
        self.handler_ns = array("q", bytes(8 * KIND_COUNT))
        # one message per kind, reused for every intercept of this VP (no allocation per exit)
        vp: Any = self  # the messages' `vp` is the VirtualProcessor this class is a part of
        self._io_msg = IoPortIntercept(vp, self.index)
        self._mem_msg = MemoryIntercept(vp, self.index)
        self._msr_msg = MsrIntercept(vp, self.index)
        self._exc_msg = ExceptionIntercept(vp, self.index)
        self._hlt_msg = HaltIntercept(vp, self.index)

    # ------------------------------------------------------------------ ending the VP thread
    def _stop_with(self, kind: VpEventKind, detail: str, **kw: Any) -> VpStopped:
        regs: Registers | None
        sregs: SpecialRegisters | None
        try:
            regs = Registers.from_kvm(self.vcpu.get_regs())
            sregs = SpecialRegisters.from_kvm(self.vcpu.get_sregs())
        except KvmError:
            regs, sregs = None, None
        return VpStopped(
            VpEvent(kind, self.index, detail, registers=regs, special_registers=sregs, **kw)
        )

    def _handler_failed(self, kind: int, what: str, e: BaseException) -> VpStopped:
        self.errors[kind] += 1
        log.error("VP %d: %s handler raised %r", self.index, what, e)
        return self._stop_with(VpEventKind.ERROR, f"{what} intercept handler raised {e!r}", error=e)

    # ------------------------------------------------------------------ port I/O
    def _fill_io_read(self, result: Any, off: int, size: int, count: int, port: int) -> None:
        b = self.vcpu.run_page.b
        n = size * count
        if isinstance(result, int):
            b[off : off + n] = (result & SIZE_MASK[size]).to_bytes(size, "little") * count
        elif isinstance(result, bytes | bytearray | memoryview) and len(result) == n:
            b[off : off + n] = bytes(result)
        else:
            raise self._handler_failed(
                IO,
                f"I/O port {port:#x}",
                TypeError(
                    f"a read handler must return an int or {n} bytes "
                    f"({count} x {size}), not {type(result).__name__}"
                ),
            )

    # ------------------------------------------------------------------ MMIO
    def _mmio_exit(
        self, table: InterceptTable, b: memoryview, h: memoryview, i32: memoryview, q: memoryview
    ) -> None:
        gpa = q[rp.MMIO_GPA]
        n = i32[rp.MMIO_LEN]
        is_write = b[rp.MMIO_IS_WRITE] != 0
        k = MEM
        if not 1 <= n <= 8:
            raise self._stop_with(VpEventKind.ERROR, f"MMIO exit length {n} is invalid")
        data = rp.MMIO_DATA
        starts = table.gpa_starts
        i = bisect.bisect_right(starts, gpa) - 1
        entry = table.gpa[i] if i >= 0 else None
        if entry is None or gpa + n > entry.end or not (entry.write if is_write else entry.read):
            self.defaults[k] += 1
            if not is_write:
                b[data : data + n] = b"\xff" * n  # unmapped GPA reads as all ones
        else:
            m = self._mem_msg
            m.gpa = gpa
            m.gva = None
            m.access_size = n
            if is_write:
                m.access_type = AccessType.WRITE
                m.value = (
                    b[data]
                    if n == 1
                    else h[rp.MMIO_DATA_H]
                    if n == 2
                    else i32[rp.MMIO_DATA_I]
                    if n == 4
                    else q[rp.MMIO_DATA_Q]
                    if n == 8
                    else int.from_bytes(b[data : data + n], "little")
                )
            else:
                m.access_type = AccessType.READ
                m.value = 0
            t0 = self._clock()
            try:
                result = entry.handler(m)
                if not is_write:
                    if result.__class__ is not int and not isinstance(result, int):
                        raise TypeError(
                            f"a read handler must return an int, not {type(result).__name__}"
                        )
                    if n == 8:
                        q[rp.MMIO_DATA_Q] = result & MASK64
                    elif n == 4:
                        i32[rp.MMIO_DATA_I] = result & 0xFFFFFFFF
                    elif n == 2:
                        h[rp.MMIO_DATA_H] = result & 0xFFFF
                    elif n == 1:
                        b[data] = result & 0xFF
                    else:
                        b[data : data + n] = (result & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
            except Exception as e:
                raise self._handler_failed(k, f"GPA {gpa:#x}", e) from None
            self.handler_ns[k] += self._clock() - t0
        self.counts[k] += 1

    # ------------------------------------------------------------------ MSRs
    def _msr_exit(
        self, table: InterceptTable, b: memoryview, i32: memoryview, q: memoryview, is_write: bool
    ) -> None:
        index = i32[rp.MSR_INDEX]
        entry = table.msr.get(index)
        k = MSR
        if entry is None or not (entry.write if is_write else entry.read):
            # KVM sent an MSR it does not know (or could not handle): #GP, as hardware does
            self.defaults[k] += 1
            b[rp.MSR_ERROR] = 1
        else:
            m = self._msr_msg
            m.msr = index
            m.gp = False
            m.access_type = AccessType.WRITE if is_write else AccessType.READ
            m.value = q[rp.MSR_DATA] if is_write else 0
            t0 = self._clock()
            try:
                result = entry.handler(m)
                if not is_write and not m.gp and not isinstance(result, int):
                    raise TypeError(
                        f"a read handler must return an int, not {type(result).__name__}"
                    )
            except Exception as e:
                raise self._handler_failed(k, f"MSR {index:#x}", e) from None
            self.handler_ns[k] += self._clock() - t0
            if m.gp:
                b[rp.MSR_ERROR] = 1
            else:
                b[rp.MSR_ERROR] = 0
                if not is_write:
                    q[rp.MSR_DATA] = result & MASK64
        self.counts[k] += 1

    # ------------------------------------------------------------------ #DB/#BP, execute
    def _debug_exit(self, table: InterceptTable, run: rp.RunPage) -> None:
        from pyhv.kvm.exits import DebugExit

        d = run.decode()
        assert isinstance(d, DebugExit)
        pc = d.pc
        if self._stepping_over:
            # the single step over an execute breakpoint is done: re-arm the breakpoints
            self._stepping_over = False
            self.vcpu.set_guest_debug(*table.guest_debug_control())
            if d.exception == 1 and 1 not in table.exception:
                return
        entry = table.execute.get(pc) if d.exception == 1 and d.dr6 & 0xF else None
        m: MemoryIntercept | ExceptionIntercept
        if entry is not None:
            k = EXE
            mem = self._mem_msg
            mem.access_type = AccessType.EXECUTE
            mem.gva = pc
            mem.access_size = 1
            mem.value = 0
            try:
                mem.gpa = self.partition.translate(self._cached_special_registers().cr3, pc)
            except ValueError:
                mem.gpa = -1
            m = mem
            handler = entry.handler
        else:
            k = EXC
            e = table.exception.get(d.exception)
            if e is None:
                # a breakpoint left over from an uninstalled intercept: step over it
                self.defaults[k] += 1
                self.counts[k] += 1
                if d.exception == 1 and pc in table.execute:
                    self._step_over_breakpoint(table, pc)
                return
            x = self._exc_msg
            x.exception_vector = d.exception
            x.pc, x.dr6, x.dr7 = pc, d.dr6, d.dr7
            m = x
            handler = e.handler
        t0 = self._clock()
        try:
            handler(m)
        except Exception as exc:
            raise self._handler_failed(k, f"exception/execute at {pc:#x}", exc) from None
        self.handler_ns[k] += self._clock() - t0
        self.counts[k] += 1
        if k == EXE:
            self._step_over_breakpoint(table, pc)

    def _step_over_breakpoint(self, table: InterceptTable, pc: int) -> None:
        """Resume at a breakpoint's instruction without hitting it again: run that one
        instruction single-stepped with the breakpoint off (RFLAGS.RF is not honoured by the
        CPL0 emulator here), then re-arm it at the single-step exit."""
        if self._regs is not None and self._regs_before is not None:
            if self._regs.rip != self._regs_before.rip:
                return  # the handler moved the VP elsewhere
        control, dr = table.guest_debug_control()
        dr7 = dr[7]
        for i in range(4):
            if dr[i] == pc and dr7 & (3 << (2 * i)):
                dr7 &= ~(3 << (2 * i))
        dr[7] = dr7
        self.vcpu.set_guest_debug(control | c.GUESTDBG_ENABLE | c.GUESTDBG_SINGLESTEP, dr)
        self._stepping_over = True

    # ------------------------------------------------------------------ HLT, the rest
    def _halt_exit(self, table: InterceptTable) -> None:
        entry = table.halt
        k = HLT
        self.counts[k] += 1
        if entry is None:
            self.defaults[k] += 1
            raise self._stop_with(VpEventKind.HALT, "the VP executed HLT")
        t0 = self._clock()
        try:
            entry.handler(self._hlt_msg)
        except Exception as e:
            raise self._handler_failed(k, "halt", e) from None
        self.handler_ns[k] += self._clock() - t0

    def _stopping_exit(self, reason: int) -> None:
        from pyhv.kvm.exits import InternalErrorExit, UnknownExit

        self.counts[UNK] += 1
        d = self.vcpu.run_page.decode()
        if reason == c.EXIT_SHUTDOWN:
            raise self._stop_with(VpEventKind.SHUTDOWN, "triple fault: the VP shut down", exit=d)
        if isinstance(d, InternalErrorExit):
            detail = f"KVM internal error, suberror {d.suberror} data {[hex(x) for x in d.data]}"
        elif isinstance(d, UnknownExit):
            detail = f"unexpected exit {d.name}"
        else:
            detail = f"unexpected exit {d!r}"
        raise self._stop_with(VpEventKind.ERROR, detail, exit=d)
