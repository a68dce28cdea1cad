"""Virtual processors: the public VP and the thread that runs it.

A VP thread runs the guest until an exit; the exit becomes an intercept message for the installed
handler (the VP is suspended meanwhile) or is given its default treatment, counted either way.
Exits that stop the VP (triple fault, an error, an uncaught handler exception, HLT with no halt
handler) end the thread and are reported as a `VpEvent` read with `wait()`.

Pausing a VP that runs guest code natively (CPL3 under PVM) needs a kick: `immediate_exit` in
kvm_run plus a signal (SIGUSR1, with a no-op handler) to the VP thread to break out of KVM_RUN.

The parts of a VP, each in its own module, bottom up: the register cache of one intercept
(regcache), the exit handlers (exithandlers), the run loop (runloop), and here its thread control
and public API. What the C run loop reads of them is declared in pyhv.kvm.loopabi.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from pyhv.hypervisor.exithandlers import MASK64
from pyhv.hypervisor.guest_ran import note_vp_thread_start
from pyhv.hypervisor.regcache import GPR_FIELDS
from pyhv.hypervisor.registers import Registers, SpecialRegisters
from pyhv.hypervisor.runloop import RunLoop
from pyhv.hypervisor.vpevents import VpEvent, VpEventKind, VpState, VpStopped
from pyhv.kvm import Vcpu
from pyhv.kvm import constants as c
from pyhv.kvm import runpage as rp

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


class VirtualProcessor(RunLoop):
    """A partition's virtual processor (a KVM vCPU) and the thread that runs it."""

    partition: Partition

    def __init__(self, partition: Partition, vcpu: Vcpu) -> None:
        super().__init__(partition, vcpu)
        self._events: queue.Queue[VpEvent] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._state = VpState.IDLE
        self._cond = threading.Condition()
        self._throttle_until = 0.0  # time.monotonic() a "throttle" request sleeps until
        self.throttled_seconds = 0.0  # slept for throttle requests, in all

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

    @property
    def thread(self) -> threading.Thread | None:
        """The VP's thread, once started (e.g. to give it a scheduling priority)."""
        return self._thread

    def _on_vp_thread(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def registers(self) -> Registers:
        """A copy of the VP's registers (an ioctl; cached for the rest of an intercept)."""
        self._check_quiescent("registers")
        if self._on_vp_thread():
            return self._cached_registers()
        return Registers.from_kvm(self.vcpu.get_regs())

    @registers.setter
    def registers(self, value: Registers) -> None:
        self._check_quiescent("registers")
        if self._on_vp_thread():
            self._set_cached_registers(value)
        else:
            self.vcpu.set_regs(value.to_kvm())

    def update_registers(self, **values: int) -> None:
        """Set some registers by name, e.g. update_registers(rax=1, rip=0x1000)."""
        bad = [n for n in values if n not in GPR_FIELDS]
        if bad:
            raise ValueError(f"unknown register name(s) {bad}: use {', '.join(GPR_FIELDS)}")
        r = self.registers
        for n, v in values.items():
            setattr(r, n, v & MASK64)
        self.registers = r

    @property
    def special_registers(self) -> SpecialRegisters:
        self._check_quiescent("special registers")
        if self._on_vp_thread():
            return self._cached_special_registers()
        return SpecialRegisters.from_kvm(self.vcpu.get_sregs())

    @special_registers.setter
    def special_registers(self, value: SpecialRegisters) -> None:
        self._check_quiescent("special registers")
        if self._on_vp_thread():
            self._set_cached_special_registers(value)
        else:
            self.vcpu.set_sregs(value.to_kvm())

    def make_runnable(self) -> None:
        """Let the VP run from its current registers. VPs other than 0 start waiting for
        INIT/SIPI under the in-kernel LAPIC; this skips that when the VMM sets them up itself."""
        self._check_quiescent("run state")
        self.vcpu.set_mp_state(c.MP_STATE_RUNNABLE)

    # ------------------------------------------------------------------ thread control
    def start(self, paused: bool = False) -> None:
        """Start (or restart) the VP thread. With `paused`, the thread parks before its first
        instruction and this returns once it is parked: resume() then runs the VP at once (a
        migration's destination makes its threads ahead of the pause)."""
        if self._state is not VpState.IDLE:
            raise RuntimeError(f"VP {self.index} is already {self._state.value}")
        if threading.current_thread() is threading.main_thread():
            install_kick_handler()
        elif not _kick_handler_ready():
            raise RuntimeError(
                "no SIGUSR1 handler is installed, so a running VP could not be paused: call "
                "pyhv.hypervisor.install_kick_handler() from the main thread first"
            )
        self._request = "pause" if paused else None
        self._attention = paused
        self._pending_exit = False
        self._state = VpState.RUNNING
        self._thread = threading.Thread(
            target=self._thread_main, name=f"vp-{self.partition.name}-{self.index}", daemon=True
        )
        self._thread.start()
        if paused:
            with self._cond:
                if not self._cond.wait_for(lambda: self._state is not VpState.RUNNING, 5.0):
                    raise TimeoutError(f"VP {self.index} did not park within 5 s")

    def _kick(self) -> None:
        # immediate_exit: a KVM_RUN about to start returns at once
        self.vcpu.run_page.b[rp.IMMEDIATE_EXIT] = 1
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

    def pause(self, timeout: float = 5.0, wait: bool = True) -> None:
        """Suspend the VP between two instructions; returns once it is suspended (at once
        without `wait`: a partition kicks all its VPs first, then waits for each)."""
        with self._cond:
            if self._state is not VpState.RUNNING:
                return
            self._request = "pause"
            self._attention = True
            self._kick()
            self._cond.notify_all()  # a VP sleeping for a throttle request pauses at once
            if not wait or threading.current_thread() is self._thread:
                return  # from a handler: takes effect when the handler returns
            if not self._cond.wait_for(lambda: self._state is not VpState.RUNNING, timeout):
                raise TimeoutError(f"VP {self.index} did not pause within {timeout} s")

    def throttle(self, until: float) -> None:
        """Sleep in the VP's own thread until `until` (time.monotonic()) at its next exit, unless
        a pause or stop comes first (they end the sleep); a later deadline replaces an earlier
        one, and 0 ends a sleep now. The dirty limit slows a VP that writes too fast with it,
        and no other VP."""
        with self._cond:
            if until <= 0:
                self._throttle_until = 0.0
                if self._request == "throttle":
                    self._request = None
                self._cond.notify_all()
                return
            if self._state is not VpState.RUNNING or until <= self._throttle_until:
                return
            self._throttle_until = until
            if self._request in (None, "throttle"):
                self._request = "throttle"
                self._attention = True
                if not self._on_vp_thread():
                    self._kick()

    def resume(self) -> None:
        """Run again; also cancels a pause asked for but not yet taken (a pause() that timed
        out on a loaded host must not suspend the VP later with nobody left to resume it)."""
        with self._cond:
            if self._request == "pause":
                self._request = None
            if self._state is VpState.PAUSED:
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
        b = self.vcpu.run_page.b
        with self._cond:
            b[rp.IMMEDIATE_EXIT] = 0
            if self._request == "throttle":
                # until the (perhaps moved) deadline; a pause or stop ends the sleep, a new
                # throttle request only moves the deadline
                t0 = now = time.monotonic()
                while self._request in (None, "throttle") and now < self._throttle_until:
                    self._request = None
                    self._cond.wait(self._throttle_until - now)
                    now = time.monotonic()
                if self._request == "throttle":
                    self._request = None
                self.throttled_seconds += now - t0
                b[rp.IMMEDIATE_EXIT] = 0
            # Parked until resume() (state back to RUNNING) or stop(). A pause() asked again
            # before this thread woke from the last resume() finds the request still "pause"
            # here: it parks again and says so (waiting on "the request changed" instead lost
            # that pause: pause() timed out on a RUNNING state and the next resume(), seeing
            # no PAUSED VP, woke nobody, so the VP stayed parked for good).
            while self._request == "pause":
                self._state = VpState.PAUSED
                self._cond.notify_all()
                self._cond.wait_for(
                    lambda: self._state is not VpState.PAUSED or self._request == "stop"
                )
                b[rp.IMMEDIATE_EXIT] = 0
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
            self.vcpu.run_page.b[rp.IMMEDIATE_EXIT] = 0
            self._cond.notify_all()
        self._events.put(event)


__all__ = [
    "KICK_SIGNAL",
    "VirtualProcessor",
    "VpEvent",
    "VpEventKind",
    "VpState",
    "VpStopped",
    "install_kick_handler",
]
