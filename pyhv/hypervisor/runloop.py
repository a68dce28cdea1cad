"""The VP run loop: KVM_RUN, then the exit delivered to its intercept handler, again and again.

The C loop (pyhv/kvm/_runloop.c, loaded by pyhv.kvm.fastrun) runs KVM_RUN and the port I/O,
MMIO and MSR exits exactly as `_loop` below does, reading only what pyhv.kvm.loopabi declares,
and leaves every other exit (and pauses and stops) to it. Where the C loop cannot be built,
`_loop` runs them all. kvm_run is read through the views of `RunPage` at the indexes that
pyhv.kvm.runpage names; everything on the hot path is a local, and an I/O exit allocates nothing
but ints.
"""

from __future__ import annotations

import fcntl
import time
from typing import Any

from pyhv.hypervisor.exithandlers import IO, MSR, ExitHandlers
from pyhv.hypervisor.intercepts import AccessType, InterceptTable
from pyhv.hypervisor.vpevents import VpEventKind
from pyhv.kvm import constants as c
from pyhv.kvm import runpage as rp


class RunLoop(ExitHandlers):
    """The loop of one VP's thread, in Python, with the C loop as its hot path when it builds."""

    _request: str | None  # "pause", "stop" or "throttle", set by other threads (VirtualProcessor)

    def __init__(self, partition: Any, vcpu: Any) -> None:
        super().__init__(partition, vcpu)
        self._request = None
        self.loop_kind = ""  # "c" or "python": which run loop the VP thread runs (once started)

    def _honour_request(self) -> bool:
        """At a safe point of the VP thread: pause or stop if asked. False = stop the thread."""
        raise NotImplementedError

    def _loop(self) -> None:
        # VP state is synced from KVM only if a handler asks (self._touched).
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
        msr_msg = self._msr_msg
        # handler time costs two clock reads per exit (~0.7 us here, a cold vDSO after each
        # exit): Partition(time_handlers=False) swaps the clock for int(), which returns 0
        perf = self._clock = time.perf_counter_ns if self.partition.time_handlers else int
        WRITE, READ = AccessType.WRITE, AccessType.READ
        # kvm_run fields and exit reasons as locals: as cheap as literals
        REASON = rp.REASON
        IO_DIRECTION, IO_SIZE, IO_PORT = rp.IO_DIRECTION, rp.IO_SIZE, rp.IO_PORT
        IO_COUNT, IO_DATA_OFFSET = rp.IO_COUNT, rp.IO_DATA_OFFSET
        MSR_INDEX, MSR_ERROR, MSR_DATA = rp.MSR_INDEX, rp.MSR_ERROR, rp.MSR_DATA
        EXIT_IO, EXIT_MMIO, EXIT_RDMSR = c.EXIT_IO, c.EXIT_MMIO, c.EXIT_X86_RDMSR
        EXIT_WRMSR, EXIT_DEBUG, EXIT_HLT, EXIT_INTR = (
            c.EXIT_X86_WRMSR,
            c.EXIT_DEBUG,
            c.EXIT_HLT,
            c.EXIT_INTR,
        )
        IO_OUT = c.IO_OUT
        EXIT_DIRTY_RING_FULL = c.EXIT_DIRTY_RING_FULL
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
                    except BlockingIOError:  # EAGAIN: a VP that took INIT/SIPI runs next time
                        continue
            reason = i32[REASON]
            if reason == EXIT_IO:
                port = h[IO_PORT]
                entry = table.io[port]
                is_write = b[IO_DIRECTION] == IO_OUT
                size = b[IO_SIZE]
                count = i32[IO_COUNT]
                off = q[IO_DATA_OFFSET]
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
            elif reason == EXIT_MMIO:
                self._mmio_exit(table, b, h, i32, q)
            elif reason == EXIT_RDMSR:  # inline like I/O: the other hot path
                index = i32[MSR_INDEX]
                msr_entry = table.msr.get(index)
                if msr_entry is None or not msr_entry.read:
                    self._msr_exit(table, b, i32, q, False)  # default: #GP
                else:
                    msr_msg.msr = index
                    msr_msg.gp = False
                    msr_msg.access_type = READ
                    msr_msg.value = 0
                    t0 = perf()
                    try:
                        result = msr_entry.handler(msr_msg)
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
                        b[MSR_ERROR] = 1
                    else:
                        b[MSR_ERROR] = 0
                        q[MSR_DATA] = result & 0xFFFFFFFFFFFFFFFF
                    counts[MSR] += 1
            elif reason == EXIT_WRMSR:
                self._msr_exit(table, b, i32, q, True)
            elif reason == EXIT_DEBUG:
                self._debug_exit(table, run)
            elif reason == EXIT_HLT:
                self._halt_exit(table)
            elif reason == EXIT_INTR:  # a signal interrupted KVM_RUN: nothing to do
                pass
            elif reason == EXIT_DIRTY_RING_FULL:
                self._dirty_ring_full()
            else:
                self._stopping_exit(reason)
            if self._touched:
                self._flush_exit_changes()

    def _dirty_ring_full(self) -> None:
        """KVM_EXIT_DIRTY_RING_FULL: harvest the rings on this thread before running again (a
        dirty limit may then ask this VP to sleep: a "throttle" request, taken next)."""
        rings = self.partition.dirty_rings
        if rings is None:
            raise self._stop_with(VpEventKind.ERROR, "dirty ring full, but the VM has no ring")
        rings.ring_full(self.index)

    def _fast_runner(self, table: InterceptTable, timed: bool) -> Any:
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
