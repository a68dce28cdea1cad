"""Virtual processors: one thread per VP looping on KVM_RUN and delivering intercepts.

A VP thread runs the guest until an exit; the exit becomes an intercept message for the installed
handler (the VP is suspended meanwhile) or is given its default treatment, counted either way.
Exits that stop the VP (triple fault, an error, an uncaught handler exception, HLT with no halt
handler) end the thread and are reported as a `VpEvent` read with `wait()`.

Pausing a VP that runs guest code natively (CPL3 under PVM) needs a kick: `immediate_exit` in
kvm_run plus a signal (SIGUSR1, with a no-op handler) to the VP thread to break out of KVM_RUN.
"""

from __future__ import annotations

import bisect
import enum
import fcntl
import logging
import queue
import signal
import threading
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyhv.hypervisor.guest_ran import note_vp_thread_start
from pyhv.hypervisor.intercepts import (
    KIND_COUNT,
    AccessType,
    ExceptionIntercept,
    HaltIntercept,
    InterceptKind,
    IoPortIntercept,
    MemoryIntercept,
    MsrIntercept,
    _Entry,
    _GpaEntry,
)
from pyhv.hypervisor.registers import Registers, SpecialRegisters, changed_fields
from pyhv.kvm import KvmError, Vcpu
from pyhv.kvm import constants as c

if TYPE_CHECKING:
    from pyhv.hypervisor.partition import Partition

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1


def install_kick_handler() -> None:
    """Install the no-op SIGUSR1 handler that lets a kick interrupt KVM_RUN (main thread only)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, signal.SIG_IGN, None):
        signal.signal(KICK_SIGNAL, _kick_noop)


def _kick_noop(signum: int, frame: Any) -> None:
    pass


def _kick_handler_ready() -> bool:
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


class VpEventKind(enum.Enum):
    HALT = "halt"  # HLT with no halt intercept: the VP stopped
    SHUTDOWN = "shutdown"  # triple fault: the VP stopped; `registers` holds its state
    STOPPED = "stopped"  # stop() was called
    ERROR = "error"  # unknown/internal exit or a handler raised: the VP stopped


@dataclass
class VpEvent:
    kind: VpEventKind
    vp_index: int
    detail: str = ""
    registers: Registers | None = None
    special_registers: SpecialRegisters | None = None
    error: BaseException | None = None
    exit: object | None = None


class VpState(enum.Enum):
    IDLE = "idle"  # not started, or its thread ended
    RUNNING = "running"
    PAUSED = "paused"


class VpStopped(Exception):
    """Raised in a VP thread to end it with an event (internal)."""

    def __init__(self, event: VpEvent) -> None:
        self.event = event


_IO, _MEM, _MSR, _EXC, _EXE, _HLT, _UNK = (int(k) for k in InterceptKind)
_MASK64 = 0xFFFFFFFFFFFFFFFF


class _LoopFlags:
    """The two flags the C run loop reads after every handler, at fixed offsets (slots)."""

    __slots__ = ("_attention", "_touched")

    def __init__(self) -> None:
        self._attention = False  # the loop must look at _request/_pending_exit
        self._touched = False  # a handler read or changed VP state during this exit


class VirtualProcessor(_LoopFlags):
    """A partition's virtual processor (a KVM vCPU) and the thread that runs it."""

    def __init__(self, partition: Partition, vcpu: Vcpu) -> None:
        self.partition = partition
        self.index = vcpu.index
        self.vcpu = vcpu
        self._events: queue.Queue[VpEvent] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._state = VpState.IDLE
        self._cond = threading.Condition()
        super().__init__()
        self._request: str | None = None  # "pause" or "stop", set by other threads
        # per-exit caches: registers are fetched only if a handler asks (then _touched is set)
        self._clock: Any = time.perf_counter_ns
        self._regs: Registers | None = None
        self._regs_before: Registers | None = None
        self._sregs: SpecialRegisters | None = None
        self._sregs_dirty = False
        self._pending_exit = False  # a new exit is already in kvm_run (found while completing)
        self._stepping_over = False  # single-stepping over an execute breakpoint
        self.loop_kind = ""  # "c" or "python": which run loop the VP thread runs (once started)
        # counters, indexed by InterceptKind (arrays of int64: the C loop adds to them in place)
        self.counts = array("q", bytes(8 * KIND_COUNT))
        self.defaults = array("q", bytes(8 * KIND_COUNT))
        self.errors = array("q", bytes(8 * KIND_COUNT))
        self.handler_ns = array("q", bytes(8 * KIND_COUNT))
        # one message per kind, reused for every intercept of this VP (no allocation per exit)
        self._io_msg = IoPortIntercept(self, self.index)
        self._mem_msg = MemoryIntercept(self, self.index)
        self._msr_msg = MsrIntercept(self, self.index)
        self._exc_msg = ExceptionIntercept(self, self.index)
        self._hlt_msg = HaltIntercept(self, self.index)

    def __repr__(self) -> str:
        return f"<VirtualProcessor {self.partition.name}:{self.index} {self._state.value}>"

    @property
    def state(self) -> VpState:
        return self._state

    # ------------------------------------------------------------------ registers
    def _check_quiescent(self, what: str) -> None:
        if self._state is VpState.RUNNING and not self._on_vp_thread():
            raise RuntimeError(
                f"VP {self.index} is running: pause() it before touching its {what}, or do it "
                "from an intercept handler"
            )

    def _on_vp_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def registers(self) -> Registers:
        """A copy of the VP's registers (an ioctl; cached for the rest of an intercept)."""
        self._check_quiescent("registers")
        if self._on_vp_thread():
            if self._regs is None:
                self._regs = Registers.from_kvm(self.vcpu.get_regs())
                self._touched = True
                self._regs_before = Registers(*(getattr(self._regs, n) for n in _GPR_FIELDS))
            return Registers(*(getattr(self._regs, n) for n in _GPR_FIELDS))
        return Registers.from_kvm(self.vcpu.get_regs())

    @registers.setter
    def registers(self, value: Registers) -> None:
        self._check_quiescent("registers")
        if self._on_vp_thread():
            self.registers  # noqa: B018 - makes sure the snapshot exists
            self._regs = Registers(*(getattr(value, n) for n in _GPR_FIELDS))
        else:
            self.vcpu.set_regs(value.to_kvm())

    def update_registers(self, **values: int) -> None:
        """Set some registers by name, e.g. update_registers(rax=1, rip=0x1000)."""
        bad = [n for n in values if n not in _GPR_FIELDS]
        if bad:
            raise ValueError(f"unknown register name(s) {bad}: use {', '.join(_GPR_FIELDS)}")
        r = self.registers
        for n, v in values.items():
            setattr(r, n, v & _MASK64)
        self.registers = r

    @property
    def special_registers(self) -> SpecialRegisters:
        self._check_quiescent("special registers")
        if self._on_vp_thread():
            if self._sregs is None:
                self._sregs = SpecialRegisters.from_kvm(self.vcpu.get_sregs())
                self._touched = True
            return self._sregs
        return SpecialRegisters.from_kvm(self.vcpu.get_sregs())

    @special_registers.setter
    def special_registers(self, value: SpecialRegisters) -> None:
        self._check_quiescent("special registers")
        if self._on_vp_thread():
            self._sregs = value
            self._sregs_dirty = True
            self._touched = True
        else:
            self.vcpu.set_sregs(value.to_kvm())

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
        run = self.vcpu.run_page
        run.b[1] = 1
        try:
            fcntl.ioctl(self.vcpu.fd, c.KVM_RUN, 0)
            self._pending_exit = True
            self._attention = True
        except InterruptedError:
            pass
        finally:
            run.b[1] = 0

    def make_runnable(self) -> None:
        """Let the VP run from its current registers. VPs other than 0 start waiting for
        INIT/SIPI under the in-kernel LAPIC; this skips that when the VMM sets them up itself."""
        self._check_quiescent("run state")
        self.vcpu.set_mp_state(c.MP_STATE_RUNNABLE)

    # ------------------------------------------------------------------ thread control
    def start(self) -> None:
        """Start (or restart) the VP thread."""
        if self._state is not VpState.IDLE:
            raise RuntimeError(f"VP {self.index} is already {self._state.value}")
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()
        elif not _kick_handler_ready():
            raise RuntimeError(
                "no SIGUSR1 handler is installed, so a running VP could not be paused: call "
                "pyhv.hypervisor.install_kick_handler() from the main thread first"
            )
        self._request = None
        self._attention = False
        self._pending_exit = False
        self._state = VpState.RUNNING
        self._thread = threading.Thread(
            target=self._thread_main, name=f"vp-{self.partition.name}-{self.index}", daemon=True
        )
        self._thread.start()

    def _kick(self) -> None:
        self.vcpu.run_page.b[1] = 1  # immediate_exit: a KVM_RUN about to start returns at once
        t = self._thread
        if (
            t is not None
            and t.ident is not None
            and t.is_alive()
            and t is not threading.current_thread()
        ):
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass

    def pause(self, timeout: float = 5.0) -> None:
        """Suspend the VP between two instructions; returns once it is suspended."""
        with self._cond:
            if self._state is not VpState.RUNNING:
                return
            self._request = "pause"
            self._attention = True
            self._kick()
            if threading.current_thread() is self._thread:
                return  # from a handler: takes effect when the handler returns
            if not self._cond.wait_for(lambda: self._state is not VpState.RUNNING, timeout):
                raise TimeoutError(f"VP {self.index} did not pause within {timeout} s")

    def resume(self) -> None:
        with self._cond:
            if self._state is VpState.PAUSED:
                self._request = None
                self._state = VpState.RUNNING
                self._cond.notify_all()

    def stop(self, timeout: float = 5.0) -> None:
        """End the VP thread (a STOPPED event is reported). The vCPU keeps its state."""
        with self._cond:
            if self._state is VpState.IDLE:
                return
            self._request = "stop"
            self._attention = True
            self._kick()
            self._cond.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)
            if t.is_alive():
                raise TimeoutError(f"VP {self.index} did not stop within {timeout} s")

    def wait(self, timeout: float | None = None) -> VpEvent | None:
        """The next event of this VP (halt, shutdown, stopped, error), or None after timeout."""
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def _honour_request(self) -> bool:
        """At a safe point of the VP thread: pause or stop if asked. False = stop the thread."""
        self._complete_pending_access()
        if self._pending_exit:
            return True  # finish the exit found in kvm_run first
        with self._cond:
            self.vcpu.run_page.b[1] = 0
            if self._request == "pause":
                self._state = VpState.PAUSED
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._request != "pause")
                self.vcpu.run_page.b[1] = 0
            if self._request == "stop":
                return False
            return True

    def _thread_main(self) -> None:
        event: VpEvent
        note_vp_thread_start(self.partition.name, self.index)  # for the suite's `guest` check
        try:
            self._loop()
            event = VpEvent(VpEventKind.STOPPED, self.index, "stop() was called")
        except VpStopped as s:
            event = s.event
        except BaseException as e:  # the VP thread's owner hears about every failure
            log.exception("VP %d failed", self.index)
            event = VpEvent(VpEventKind.ERROR, self.index, f"VP thread failed: {e!r}", error=e)
        with self._cond:
            self._state = VpState.IDLE
            self._request = None
            self.vcpu.run_page.b[1] = 0
            self._cond.notify_all()
        self._events.put(event)

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

    # ------------------------------------------------------------------ the run loop
    def _loop(self) -> None:
        # The hot path: everything it needs is a local, an I/O exit allocates nothing but ints,
        # and VP state is synced from KVM only if a handler asks (self._touched).
        vcpu = self.vcpu
        fd = vcpu.fd
        run = vcpu.run_page
        b, h, i32, q = run.b, run.h, run.i, run.q
        run_size = run.size
        ioctl = fcntl.ioctl
        KVM_RUN = c.KVM_RUN
        table = self.partition.intercepts
        counts, defaults, handler_ns = self.counts, self.defaults, self.handler_ns
        io_msg = self._io_msg
        # handler time costs two clock reads per exit (~0.7 us here, a cold vDSO after each
        # exit): Partition(time_handlers=False) swaps the clock for int(), which returns 0
        perf = self._clock = time.perf_counter_ns if self.partition.time_handlers else int
        WRITE, READ = AccessType.WRITE, AccessType.READ
        IO, MSR = _IO, _MSR
        msr_msg = self._msr_msg
        # The C loop (pyhv/kvm/_runloop.c) runs KVM_RUN and the I/O, MMIO and MSR exits exactly
        # as the code below does, and leaves every other exit to it.
        fast_run = self._fast_runner(table, perf is not int)
        while True:
            if self._attention:
                step = self._attend()
                if step < 0:
                    return
            else:
                step = 0
            if step == 0:
                if fast_run is not None:
                    reason = fast_run()
                    if reason < 0:  # -1: EINTR (a kick); -2: the VP needs attention
                        if reason == -1:
                            self._attention = True
                        continue
                else:
                    try:
                        ioctl(fd, KVM_RUN, 0)
                    except InterruptedError:
                        self._attention = True  # a kick: a pause or stop is asked for
                        continue
            reason = i32[2]
            if reason == 2:  # KVM_EXIT_IO
                port = h[17]
                entry = table.io[port]
                is_write = b[32] == 1
                size = b[33]
                count = i32[9]
                off = q[5]
                n = size * count
                if off <= 0 or off + n > run_size or off & 3:
                    raise self._stop_with(
                        VpEventKind.ERROR, f"I/O exit data offset {off} length {n} is invalid"
                    )
                if entry is None or not (entry.write if is_write else entry.read):
                    defaults[IO] += 1
                    if not is_write:  # open bus: reads return all ones
                        b[off : off + n] = b"\xff" * n
                else:
                    io_msg.port = port
                    io_msg.access_size = size
                    io_msg.count = count
                    if is_write:
                        io_msg.access_type = WRITE
                        if count == 1:
                            io_msg.value = (
                                b[off] if size == 1 else h[off >> 1] if size == 2 else i32[off >> 2]
                            )
                        else:
                            io_msg._data = bytes(b[off : off + n])
                            io_msg.value = int.from_bytes(io_msg._data[:size], "little")
                    else:
                        io_msg.access_type = READ
                        io_msg.value = 0
                    t0 = perf()
                    try:
                        result = entry.handler(io_msg)
                    except Exception as e:
                        raise self._handler_failed(IO, f"I/O port {port:#x}", e) from None
                    handler_ns[IO] += perf() - t0
                    if not is_write:
                        if count == 1 and result.__class__ is int:
                            if size == 1:
                                b[off] = result & 0xFF
                            elif size == 2:
                                h[off >> 1] = result & 0xFFFF
                            else:
                                i32[off >> 2] = result & 0xFFFFFFFF
                        else:
                            self._fill_io_read(result, off, size, count, port)
                    elif count != 1:
                        io_msg._data = b""
                counts[IO] += 1
            elif reason == 6:
                self._mmio_exit(table, b, h, i32, q)
            elif reason == 29:  # KVM_EXIT_X86_RDMSR, inline like I/O: the other hot path
                # kvm_run.msr: error @32, index @44 (i32[11]), data @48 (q[6])
                index = i32[11]
                entry = table.msr.get(index)
                if entry is None or not entry.read:
                    self._msr_exit(table, b, i32, q, False)  # default: #GP
                else:
                    msr_msg.msr = index
                    msr_msg.gp = False
                    msr_msg.access_type = READ
                    msr_msg.value = 0
                    t0 = perf()
                    try:
                        result = entry.handler(msr_msg)
                        if not msr_msg.gp and result.__class__ is not int:
                            if not isinstance(result, int):
                                raise TypeError(
                                    "a read handler must return an int, "
                                    f"not {type(result).__name__}"
                                )
                    except Exception as e:
                        raise self._handler_failed(MSR, f"MSR {index:#x}", e) from None
                    handler_ns[MSR] += perf() - t0
                    if msr_msg.gp:
                        b[32] = 1
                    else:
                        b[32] = 0
                        q[6] = result & 0xFFFFFFFFFFFFFFFF
                    counts[MSR] += 1
            elif reason == 30:
                self._msr_exit(table, b, i32, q, True)
            elif reason == 4:
                self._debug_exit(table, run)
            elif reason == 5:
                self._halt_exit(table)
            elif reason == 10:  # KVM_EXIT_INTR: nothing to do
                pass
            else:
                self._stopping_exit(reason)
            if self._touched:
                self._flush_exit_changes()

    def _fast_runner(self, table: Any, timed: bool) -> Any:
        """The bound run() of a C runner for this loop, or None: the Python loop then."""
        from pyhv.kvm import fastrun

        mod = fastrun.load()
        if mod is None:
            self.loop_kind = "python"
            return None
        runner = mod.Runner(
            self.vcpu.fd,
            self.vcpu.run_page.mm,
            self,
            table,
            self._io_msg,
            self._mem_msg,
            self._msr_msg,
            self.counts,
            self.defaults,
            self.handler_ns,
            timed,
            AccessType.READ,
            AccessType.WRITE,
            _Entry,
            _GpaEntry,
            _LoopFlags,
        )
        self.loop_kind = "c"
        return runner.run

    def _attend(self) -> int:
        """Slow path of the loop: 1 = handle the exit already in kvm_run, 0 = run, -1 = end."""
        if not self._pending_exit and self._request is not None:
            if not self._honour_request():
                return -1
        if self._pending_exit:
            self._pending_exit = False
            self._attention = self._request is not None
            return 1
        self._attention = self._request is not None
        return 0

    def _fill_io_read(self, result: Any, off: int, size: int, count: int, port: int) -> None:
        b = self.vcpu.run_page.b
        n = size * count
        if isinstance(result, int):
            b[off : off + n] = (result & _SIZE_MASK[size]).to_bytes(size, "little") * count
        elif isinstance(result, bytes | bytearray | memoryview) and len(result) == n:
            b[off : off + n] = bytes(result)
        else:
            raise self._handler_failed(
                _IO,
                f"I/O port {port:#x}",
                TypeError(
                    f"a read handler must return an int or {n} bytes "
                    f"({count} x {size}), not {type(result).__name__}"
                ),
            )

    def _mmio_exit(
        self, table: Any, b: memoryview, h: memoryview, i32: memoryview, q: memoryview
    ) -> None:
        # kvm_run.mmio: phys_addr @32 (q[4]), data @40, len @48 (i32[12]), is_write @52
        gpa = q[4]
        n = i32[12]
        is_write = b[52] != 0
        k = _MEM
        if not 1 <= n <= 8:
            raise self._stop_with(VpEventKind.ERROR, f"MMIO exit length {n} is invalid")
        starts = table.gpa_starts
        i = bisect.bisect_right(starts, gpa) - 1
        entry = table.gpa[i] if i >= 0 else None
        if entry is None or gpa + n > entry.end or not (entry.write if is_write else entry.read):
            self.defaults[k] += 1
            if not is_write:
                b[40 : 40 + n] = b"\xff" * n  # unmapped GPA reads as all ones
        else:
            m = self._mem_msg
            m.gpa = gpa
            m.gva = None
            m.access_size = n
            if is_write:
                m.access_type = AccessType.WRITE
                m.value = (
                    b[40]
                    if n == 1
                    else h[20]
                    if n == 2
                    else i32[10]
                    if n == 4
                    else q[5]
                    if n == 8
                    else int.from_bytes(b[40 : 40 + n], "little")
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
                        q[5] = result & _MASK64
                    elif n == 4:
                        i32[10] = result & 0xFFFFFFFF
                    elif n == 2:
                        h[20] = result & 0xFFFF
                    elif n == 1:
                        b[40] = result & 0xFF
                    else:
                        b[40 : 40 + n] = (result & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
            except Exception as e:
                raise self._handler_failed(k, f"GPA {gpa:#x}", e) from None
            self.handler_ns[k] += self._clock() - t0
        self.counts[k] += 1

    def _msr_exit(
        self, table: Any, b: memoryview, i32: memoryview, q: memoryview, is_write: bool
    ) -> None:
        # kvm_run.msr: error @32, reason @40 (i32[10]), index @44 (i32[11]), data @48 (q[6])
        index = i32[11]
        entry = table.msr.get(index)
        k = _MSR
        if entry is None or not (entry.write if is_write else entry.read):
            # KVM sent an MSR it does not know (or could not handle): #GP, as hardware does
            self.defaults[k] += 1
            b[32] = 1
        else:
            m = self._msr_msg
            m.msr = index
            m.gp = False
            m.access_type = AccessType.WRITE if is_write else AccessType.READ
            m.value = q[6] if is_write else 0
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
                b[32] = 1
            else:
                b[32] = 0
                if not is_write:
                    q[6] = result & _MASK64
        self.counts[k] += 1

    def _debug_exit(self, table: Any, run: Any) -> None:
        d = run.decode()
        pc = d.pc
        if self._stepping_over:
            # the single step over an execute breakpoint is done: re-arm the breakpoints
            self._stepping_over = False
            self.partition._apply_guest_debug(self)
            if d.exception == 1 and 1 not in table.exception:
                return
        entry = table.execute.get(pc) if d.exception == 1 and d.dr6 & 0xF else None
        if entry is not None:
            k = _EXE
            m = self._mem_msg
            m.access_type = AccessType.EXECUTE
            m.gva = pc
            m.access_size = 1
            m.value = 0
            try:
                m.gpa = self.partition.translate(self.special_registers.cr3, pc)
            except ValueError:
                m.gpa = -1
            handler = entry.handler
        else:
            k = _EXC
            e = table.exception.get(d.exception)
            if e is None:
                # a breakpoint left over from an uninstalled intercept: step over it
                self.defaults[k] += 1
                self.counts[k] += 1
                if d.exception == 1 and pc in table.execute:
                    self._step_over_breakpoint(pc)
                return
            x = self._exc_msg
            x.exception_vector = d.exception
            x.pc, x.dr6, x.dr7 = pc, d.dr6, d.dr7
            m = x  # type: ignore[assignment]
            handler = e.handler
        t0 = self._clock()
        try:
            handler(m)
        except Exception as exc:
            raise self._handler_failed(k, f"exception/execute at {pc:#x}", exc) from None
        self.handler_ns[k] += self._clock() - t0
        self.counts[k] += 1
        if k == _EXE:
            self._step_over_breakpoint(pc)

    def _step_over_breakpoint(self, pc: int) -> None:
        """Resume at a breakpoint's instruction without hitting it again: run that one
        instruction single-stepped with the breakpoint off (RFLAGS.RF is not honoured by the
        CPL0 emulator here), then re-arm it at the single-step exit."""
        if self._regs is not None and self._regs_before is not None:
            if self._regs.rip != self._regs_before.rip:
                return  # the handler moved the VP elsewhere
        control, dr = self.partition.intercepts.guest_debug_control()
        dr7 = dr[7]
        for i in range(4):
            if dr[i] == pc and dr7 & (3 << (2 * i)):
                dr7 &= ~(3 << (2 * i))
        dr[7] = dr7
        self.vcpu.set_guest_debug(control | c.GUESTDBG_ENABLE | c.GUESTDBG_SINGLESTEP, dr)
        self._stepping_over = True

    def _halt_exit(self, table: Any) -> None:
        entry = table.halt
        k = _HLT
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

        self.counts[_UNK] += 1
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


_GPR_FIELDS = tuple(Registers.__dataclass_fields__)
_SIZE_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: _MASK64}
