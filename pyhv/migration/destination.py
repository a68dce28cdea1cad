"""The destination side of a live migration: accept one authenticated source, create the VM
from the configuration it sends, take memory passes straight into guest RAM, restore the VP and
device state, check RAM against the source's checksum, and resume when the source commits.

:meth:`Incoming.accept` runs before the VM exists (it yields the configuration);
:meth:`Incoming.ram_ready` is the hook ``VirtualMachine.start(early=...)`` calls as soon as the
partition exists and its RAM is mapped: it sends READY and takes the passes on a thread of its
own while KVM's RAM slots, the VPs and the devices are made (needed only at the pause, where it
waits for them);
:meth:`Incoming.receive` is the hook ``VirtualMachine.start(incoming=...)`` calls once the
partition, its RAM and its VPs exist, their threads parked before their first instruction: it
wakes them (``VirtualMachine.run_incoming``) as soon as the state is restored and checked (and,
with two-phase commit, COMMIT came); :meth:`Incoming.resumed` then tells the source the VPs run
and takes the serial input typed there during the pause. Any error raises MigrationError; the caller discards the VM (the
worker process exits), so the destination holds nothing.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from pyhv.memory.manager import punch_hole
from pyhv.migration import dynmem as dm_mod
from pyhv.migration import frames
from pyhv.migration import memory as mem
from pyhv.migration import state as vm_state
from pyhv.migration.faults import FaultPlan
from pyhv.migration.postcopy import PostcopyDestination
from pyhv.migration.realtime import Boost
from pyhv.migration.recovery import RECOVER_TIMEOUT
from pyhv.migration.state import VmState
from pyhv.migration.stream import (
    COMPRESSED,
    MAX_STREAMS,
    Frame,
    FrameSocket,
    MigrationError,
    authenticate_destination,
    join_destination,
    token_bytes,
    unpack_zero_runs,
    warm_up,
)
from pyhv.migration.tracing import trace_phase

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyhv.hypervisor.memory import MemoryRegion
    from pyhv.worker.vm import VirtualMachine

log = logging.getLogger("pyhv.migration")
PAGE = mem.PAGE


def available_memory() -> int:
    """MemAvailable of this host, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Incoming:
    """One incoming migration on a listening socket."""

    def __init__(
        self,
        listener: socket.socket,
        token: str | bytes,
        *,
        max_memory: int | None = None,
        timeout: float = 30.0,
        accept_timeout: float = 300.0,
        faults: dict[str, str] | None = None,
        userfault_device: int | None = None,
        recover_timeout: float = RECOVER_TIMEOUT,
    ) -> None:
        self.listener = listener
        #: where a post-copy's source comes back after a cut link, and for how long it may
        #: take (pyhv.migration.recovery)
        self.address: tuple[str, int] = listener.getsockname()[:2]
        self.recover_timeout = recover_timeout
        self.userfault_device = userfault_device  # for post-copy: /dev/userfaultfd, or None
        self.token = token_bytes(token)
        self.max_memory = max_memory
        self.timeout = timeout
        self.accept_timeout = accept_timeout
        self.faults = FaultPlan(faults)
        self.fs: FrameSocket | None = None
        self.peer: str = ""
        self.config: dict[str, Any] = {}
        self.regions: list[list[int]] = []
        self.verify = True
        self.two_phase = False
        self.postcopy_at_once = False  # the source pauses right after READY
        self.postcopy_checksum = True  # post-copy: sum RAM for POSTCOPY_DONE
        self._vm: VirtualMachine | None = None  # the VM the passes come into (PREPARE's)
        self.passes = 0
        self.pages = 0
        self.t_commit = 0.0
        self.serial_input = 0  # bytes typed at the source during the pause, fed here
        #: ms of the destination's part of the downtime (sent back with RESUMED)
        self.parts: dict[str, float] = {}
        self._t_state = 0.0
        #: The state restored as it came, ahead of the last pages (set by receive(); None:
        #: after them): when it was done, or 0.0
        self._restore_early: Callable[[VmState], None] | None = None
        self._t_restored = 0.0
        self._commit_reader: threading.Thread | None = None
        #: Called once the VM is committed here, before its VPs run; raising keeps them parked
        #: and fails the arrival (the worker's owner confirming the VM: pyhv.migration.worker).
        self.gate: Callable[[], None] | None = None
        #: Called at PREPARE, before the source pauses: the owner's word on the arrival taken
        #: ahead, so that `gate` has no round trip left inside the pause; raising fails the
        #: arrival (the source has not paused yet: it runs on).
        self.authorize: Callable[[], None] | None = None
        #: SCHED_FIFO for the receiver and the parked VPs from PREPARE until they run
        self._boost = Boost()
        self._final_frames = -1  # page frames since PREPARE (-1: none came)
        self.dynmem_layout: dict[str, Any] | None = None
        self._populater = _Populater()
        self.postcopy: PostcopyDestination | None = None
        self.data: list[FrameSocket] = []  #: the data streams, after the first one
        self._first_pages = False  # the first stream's first PAGES frame came
        self._data_error: BaseException | None = None
        self._stopping = False  # the first stream's thread gave up: the others just stop
        self._data_done = threading.Lock()  # the page count, updated by every receiving thread
        #: every receiving thread waits here at each PASS_END: a pass's pages are all in guest
        #: RAM before any of the next pass is read (a page may change streams between passes)
        self._pass_end: threading.Barrier | None = None
        self._data_last = 0  # data streams whose last pass ended (PASS_END with `last`)
        self._met_final = False  # their final pass's barrier passed at PREPARE, out of the pause
        self._local = threading.local()  # a zstd decompressor per receiving thread
        #: With READY sent at ram_ready: the first stream's receiving thread, set once the VPs
        #: and devices exist (at once otherwise), and what ended that thread badly
        self._receiver: threading.Thread | None = None
        self._built = threading.Event()
        self._built.set()
        self._abandoned = False
        self._receive_error: BaseException | None = None
        self._data_threads: list[threading.Thread] = []  # the data streams' receivers

    def accept(self) -> dict[str, Any]:
        """Wait for the source, authenticate it, read the configuration (returned, as sent)."""
        self.listener.settimeout(self.accept_timeout)
        warm_up()  # while no source is there yet
        try:
            sock, addr = self.listener.accept()
        except TimeoutError:
            self.listener.close()
            raise MigrationError(
                f"no source connected within {self.accept_timeout} s", "accept"
            ) from None
        self.peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        fs = self.fs = FrameSocket(sock, timeout=self.timeout, peer="source")
        try:
            self.faults.at("authenticate", fs)
            authenticate_destination(fs, self.token)
            msg = fs.expect(Frame.CONFIG, frames.Config, "config")
            self.faults.at("config", fs)
            config, regions = msg.config, [list(r) for r in msg.regions]
            self.config, self.regions = config, regions
            self.verify = msg.options.verify
            self.two_phase = msg.options.two_phase_commit
            self.postcopy_at_once = msg.options.postcopy_at_once
            self.postcopy_checksum = msg.options.postcopy_checksum
            self.dynmem_layout = msg.dynmem
            need = sum(size for _gpa, size in regions)
            have = self.max_memory if self.max_memory is not None else available_memory()
            if need > have:
                raise MigrationError(
                    f"destination out of memory: the VM needs {need >> 20} MiB of RAM, this host "
                    f"can give {have >> 20} MiB",
                    "config",
                )
            if msg.options.streams > 1:
                self._join_streams(msg.options.streams)
        except BaseException as e:
            self.fail(e)
            raise
        finally:
            self.listener.close()
        return config

    def _join_streams(self, streams: int) -> None:
        """Accept the source's data streams 1..streams-1 on the listener (each proves it holds
        its keys with a sealed JOIN; anything else fails the migration)."""
        assert self.fs is not None
        self.listener.settimeout(self.timeout)
        joined: dict[int, FrameSocket] = {}
        while len(joined) < streams - 1:
            try:
                sock, _addr = self.listener.accept()
            except TimeoutError:
                raise MigrationError(
                    f"{len(joined)} of {streams - 1} data streams joined within {self.timeout} s",
                    "streams",
                ) from None
            fs = join_destination(self.fs, sock, streams)
            if fs.index in joined:
                fs.close(reset=True)
                raise MigrationError(f"data stream {fs.index} joined twice: refused", "streams")
            joined[fs.index] = fs
        self.data = [joined[i] for i in sorted(joined)]

    def fail(self, e: BaseException) -> None:
        """Tell the source why we give up, and drop the connection."""
        self._boost.end()
        self._populater.stop()
        if self.postcopy is not None:
            self.postcopy.abandon()
        if self.fs is not None:
            self.fs.abort(str(e) or type(e).__name__)
            self.fs.close(reset=True)
        for fs in self.data:
            fs.close(reset=True)
        self._end_data_streams(failed=True)

    # --- the VirtualMachine.start hooks --------------------------------------------------

    def ram_ready(self, vm: VirtualMachine) -> None:
        """The hook ``VirtualMachine.start(early=...)`` calls once the partition exists and its
        RAM is mapped, before KVM's slots, the VPs and devices: the layout checked, READY sent, the
        source's passes taken on a thread of their own while the rest of the VM is built (it is
        needed only at the pause; the receiver waits for it there). A VM with Dynamic Memory
        maps its hot-added regions with its DM service, and a post-copy at once pauses right
        after READY (the build would be inside its pause): their READY waits for :meth:`receive`."""
        if self.dynmem_layout is not None or vm.config.dynamic_memory or self.postcopy_at_once:
            return
        fs = self.fs
        assert fs is not None
        try:
            written = self._ready(vm)
        except BaseException as e:
            self.fail(e)
            raise
        self._built.clear()
        self._receiver = threading.Thread(
            target=self._receive_early, args=(vm, written), name="migration-in-0", daemon=True
        )
        self._receiver.start()

    def _receive_early(self, vm: VirtualMachine, written: dict[int, np.ndarray]) -> None:
        try:
            self._take(vm, written)
        except BaseException as e:  # noqa: BLE001 - raised again by receive() on its thread
            self._receive_error = e

    def abandon(self, e: BaseException) -> None:
        """The VM could not be built after :meth:`ram_ready`: tell the source, and stop the
        receiving thread before the RAM it writes into goes away."""
        if self._abandoned:
            return
        self._abandoned = True
        if self._receive_error is None:  # still receiving (else the source was told already)
            self.fail(e)
        self._built.set()
        if self._receiver is not None:
            self._receiver.join(self.timeout)

    def _wait_built(self) -> None:
        """The VPs and devices exist (at once unless :meth:`ram_ready` sent READY early)."""
        if not self._built.wait(self.timeout) or self._abandoned:
            raise MigrationError(f"the VM was not built here within {self.timeout} s", "config")

    def receive(self, vm: VirtualMachine) -> None:
        if self._receiver is not None:  # READY went at ram_ready: the passes arrive meanwhile
            vm_state.prepare(vm, destination=True)  # failing, VirtualMachine.start abandons
            self.faults.at("build", self.fs)
            self._built.set()
            self._receiver.join()  # its reads and waits all have timeouts
            if self._receive_error is not None:
                raise self._receive_error
            return
        try:
            if self.dynmem_layout is not None:
                if vm.dynmem is None:
                    raise MigrationError(
                        "the VM has Dynamic Memory, the one built here not", "config"
                    )
                dm_mod.prepare(vm.dynmem, self.dynmem_layout)
            written = self._ready(vm)
            vm_state.prepare(vm, destination=True)  # while the source sends pass 1
        except BaseException as e:
            self.fail(e)
            raise
        self._take(vm, written)

    def _ready(self, vm: VirtualMachine) -> dict[int, np.ndarray]:
        """Check the RAM built here against the source's layout and send READY; returns the
        pages written so far (none) per region."""
        fs, p = self.fs, vm.partition
        assert fs is not None and p is not None
        ram = p.ram
        have = sorted([r.gpa, r.size] for r in ram)
        if have != sorted([int(g), int(s)] for g, s in self.regions):
            raise MigrationError(
                f"the source's RAM layout {self.regions} differs from the VM built here {have}",
                "config",
            )
        written = {r.gpa: np.zeros(r.pages, dtype=bool) for r in ram}
        fs.send_json(Frame.READY, frames.Empty())
        return written

    def _take(self, vm: VirtualMachine, written: dict[int, np.ndarray]) -> None:
        """The passes, the state and the commit, up to the VPs running."""
        fs = self.fs
        p = vm.partition
        assert fs is not None and p is not None
        ram = p.ram
        self._vm = vm
        try:
            trace_phase(vm, "destination", "memory", fs.bytes_received, self.pages)
            self._restore_early = lambda st: self._restore(vm, st)
            state = self._memory(vm, written)
            self._wait_built()  # the devices restore into (a post-copy comes without PREPARE)
            t = time.monotonic()
            if self._t_restored:  # the state came first: restored while the pages came
                self.parts["pages_in"] = round((t - self._t_restored) * 1000, 3)
            elif self.postcopy is None:  # (post-copy: the pages come after the VM runs)
                self.parts["state_in"] = round((t - self._t_state) * 1000, 3)
            trace_phase(vm, "destination", "state", fs.bytes_received, self.pages)
            self.faults.at("state", fs)
            if self.postcopy is not None:  # RAM fetched on demand from here on
                self._end_data_streams()  # (none: post-copy uses one stream)
                self.postcopy.start(vm, ram, written, self.postcopy_checksum)
                self.parts["postcopy_start"] = round((time.monotonic() - t) * 1000, 3)
                self._restore(vm, state)
                fs.send_json(Frame.RESTORED, frames.Empty())
                t = time.monotonic()
                self.postcopy.wait_commit(self.timeout)
                self.t_commit = time.monotonic()
                self.parts["commit_wait"] = round((self.t_commit - t) * 1000, 3)
                if self.gate is not None:  # the owner's word before the VPs run, as pre-copy
                    self.gate()  # (asked at PREPARE already, unless an older source sent none)
                    self.parts["gate"] = round((time.monotonic() - self.t_commit) * 1000, 3)
                vm.run_incoming()  # (VirtualMachine.start would: here, so the boost ends after)
                self._boost.end()
                self.parts.update({f"realtime_{k}": v for k, v in self._boost.counts().items()})
                trace_phase(vm, "destination", "commit", fs.bytes_received, self.pages)
                return
            if not self._t_restored:
                self._restore(vm, state)
            if self.verify:
                want = fs.expect(Frame.CHECKSUM, frames.Checksum, "verify").ram
                if "state:tamper" in self.faults.fired:
                    _flip_a_bit(ram)
                self._boost.drop()  # a pass over all RAM: not at a real-time priority
                got = mem.ram_checksum(ram)
                self._boost.add()
                if got != want:
                    raise MigrationError(
                        f"guest RAM differs from the source's at pause (checksum {got} here, "
                        f"{want} there)",
                        "verify",
                    )
            self.faults.at("restored", fs)
            t = time.monotonic()
            if self.two_phase:
                fs.send_json(Frame.RESTORED, frames.Empty())
                self.parts["to_restored"] = round((t - self._t_state) * 1000, 3)
                commit = fs.expect(Frame.COMMIT, frames.Commit, "commit")
                self.t_commit = time.monotonic()
                self.parts["commit_wait"] = round((self.t_commit - t) * 1000, 3)
                self._typed(vm, commit)
            else:
                self.t_commit = t  # the STATE frame committed
            if self.gate is not None:
                self.gate()
                self.parts["gate"] = round((time.monotonic() - self.t_commit) * 1000, 3)
            if not self.two_phase:
                _source_still_there(fs)
            vm.run_incoming()  # the VPs are parked, their state in place: only woken
            self._boost.end()  # they run: at the ordinary priority from here
            self._end_data_streams()
            self.parts.update({f"realtime_{k}": v for k, v in self._boost.counts().items()})
            trace_phase(vm, "destination", "commit", fs.bytes_received, self.pages)
        except BaseException as e:
            self.fail(e)
            raise

    def _restore(self, vm: VirtualMachine, state: VmState) -> None:
        self._wait_built()  # its devices (already there after PREPARE, which waited for them)
        t = time.monotonic()
        vm_state.restore(vm, state)
        self._t_restored = time.monotonic()
        self.parts["restore"] = round((self._t_restored - t) * 1000, 3)

    def _memory(self, vm: VirtualMachine, written: dict[int, np.ndarray]) -> VmState:
        """Frames up to STATE: pages into guest RAM, zero markers, pass ends; the data
        streams' pages on threads of their own (each straight into guest RAM)."""
        fs = self.fs
        p = vm.partition
        assert fs is not None and p is not None
        threads = [
            threading.Thread(
                target=self._data_stream, args=(d, p, written), name=f"migration-in-{d.index}",
                daemon=True,
            )
            for d in self.data
        ]  # fmt: skip
        self._pass_end = threading.Barrier(1 + len(threads))
        for t in threads:
            t.start()
        self._data_threads = threads
        try:
            state = self._first_stream(fs, p, written)
        except BaseException as e:
            self._end_data_streams(failed=True)
            if isinstance(e, OSError | MigrationError) and self._data_error is not None:
                raise self._data_error from None  # a data stream failed first: that is why
            raise
        # The data streams' threads are done (their last pass is in, the barrier passed):
        # joined once the VM runs, not inside the pause (waiting for each to be scheduled).
        return state

    def _end_data_streams(self, failed: bool = False) -> None:
        threads, self._data_threads = self._data_threads, []
        if failed and any(t.is_alive() for t in threads):  # unblock their reads
            self._stopping = True
            if self._pass_end is not None:
                self._pass_end.abort()
            for d in self.data:
                d.close(reset=True)
        for t in threads:
            t.join(self.timeout)
        for d in self.data:  # done with (their last pass is in)
            d.close()

    def _first_stream(self, fs: FrameSocket, p: Any, written: dict[int, np.ndarray]) -> VmState:
        state: VmState | None = None  # the state, come ahead of the last pages
        while True:
            ftype, buf = self._frame(fs, p, written, first=True)
            if state is not None and ftype not in _AFTER_STATE:
                raise MigrationError(
                    f"unexpected {ftype.name} frame after the state: only the last pages and "
                    "PASS_END follow it",
                    "state",
                )
            if ftype in (Frame.PAGES, Frame.ZERO):
                if self._final_frames >= 0:
                    self._final_frames += 1
                    if self._final_frames > MAX_BOOSTED_FRAMES:  # not a pause's last pages
                        self._boost.end()
                continue
            if ftype is Frame.EXTENTS:
                runs = unpack_zero_runs(bytes(buf))
                for gpa, n in runs:
                    self._region(p, gpa, n)  # inside RAM, or the stream is refused
                self._populater.add(p, runs)
            elif ftype is Frame.PASS_END:
                _body(buf, frames.PassEnd, "PASS_END", "memory")  # checked, though unused here
                self.passes += 1
                self._populater.stop()
                if not self._met_final:
                    self._all_streams_at_pass_end()
                self._t_state = time.monotonic()  # after the last one: the state
                if state is not None:  # the last pages, after the state: all in now
                    return state
            elif ftype is Frame.STATE:
                if state is not None:
                    raise MigrationError("the source sent STATE twice", "state")
                t = time.monotonic()
                state = VmState.decode(bytes(buf))
                if self._final_frames < 0 or self.postcopy is not None:
                    return state  # no PREPARE (post-copy): the pages come after the VM runs
                # After PREPARE the state comes first and the last pages after it: checked
                # and restored into the parked VPs now, while the source sends them (the VM
                # runs only once they are in). Not the Dynamic Memory and page file states:
                # what they restore reads guest RAM, which those pages may still change.
                self.parts["state_in"] = round((time.monotonic() - t) * 1000, 3)
                if (
                    self._restore_early is not None
                    and state.dynmem is None
                    and state.storage is None
                ):
                    self._restore_early(state)
            elif ftype is Frame.PREPARE:
                _body(buf, frames.Empty, "PREPARE", "prepare")
                if self._final_frames >= 0:
                    raise MigrationError("the source sent PREPARE twice", "memory")
                self._final_frames = 0
                if self.postcopy is not None:  # RAM registered, listening: out of the pause
                    self._wait_built()
                    assert self._vm is not None
                    ram = p.ram
                    self.postcopy.prepare(self._vm, ram, written, self.postcopy_checksum)
                self._prepare(p)
                self._meet_final_pass()
                fs.send_json(Frame.PREPARED, frames.Empty())
            elif ftype is Frame.POSTCOPY:
                if self.data:  # its pages and requests use the first stream alone
                    raise MigrationError(
                        f"POSTCOPY over {1 + len(self.data)} streams: post-copy uses one", "memory"
                    )
                body = _body(buf, frames.Postcopy, "POSTCOPY", "memory")
                self.postcopy = PostcopyDestination(
                    fs,
                    self.userfault_device,
                    migration=body.migration,
                    resume_at=(self.address, self.token),
                    recover_timeout=self.recover_timeout,
                    timeout=self.timeout,
                )
            elif ftype is Frame.NEED and self.postcopy is not None:
                runs = unpack_zero_runs(bytes(buf))
                for gpa, n in runs:
                    self._region(p, gpa, n)  # inside RAM, or the stream is refused
                self.postcopy.add_need(runs, sum(w.size for w in written.values()))
            elif ftype is Frame.ABORT:
                reason = bytes(buf).decode(errors="replace")
                raise MigrationError(f"the source aborted: {reason}", "memory")
            else:
                raise MigrationError(
                    f"unexpected {ftype.name} frame during the memory passes", "memory"
                )

    def _prepare(self, p: Any) -> None:
        """The source pauses next: the owner's word on the arrival now (out of the pause), and
        this receiver and the parked VP threads at a real-time priority until the VPs run."""
        self._wait_built()  # the VP threads below, the owner's hooks (ram_ready sent READY early)
        self.faults.at("prepare", self.fs)
        if self.authorize is not None:
            self.authorize()
        self._boost.add()
        for vp in p.vps.values():
            self._boost.add(vp.thread)

    def _frame(
        self, fs: FrameSocket, p: Any, written: dict[int, np.ndarray], first: bool = False
    ) -> tuple[Frame, bytearray]:
        """The next frame of `fs`: PAGES and ZERO applied to guest RAM here, any other returned
        with its payload. `first`: the first stream (the test-only fault before its first page)."""
        ftype, flags, length, count, addr, check = fs.recv_header()
        if ftype is Frame.PAGES:
            if first and not self._first_pages:
                self._first_pages = True
                self.faults.at("memory", fs)
            self._pages(fs, p, written, flags, length, count, addr, check)
            return ftype, bytearray()
        buf = bytearray(length)
        fs.recv_payload_into(memoryview(buf), ftype, flags, count, addr, check)
        if ftype is Frame.ZERO:
            self._zero(p, written, buf)
        return ftype, buf

    def _data_stream(self, fs: FrameSocket, p: Any, written: dict[int, np.ndarray]) -> None:
        """One data stream's frames (PAGES, ZERO, PASS_END) until the last pass ended."""
        try:
            while True:
                ftype, buf = self._frame(fs, p, written)
                if ftype in (Frame.PAGES, Frame.ZERO):
                    continue
                if ftype is not Frame.PASS_END:
                    raise MigrationError(
                        f"unexpected {ftype.name} frame on data stream {fs.index}", "memory"
                    )
                end = frames.decode(bytes(buf), frames.PassEnd, "PASS_END")
                if end.last:
                    with self._data_done:
                        self._data_last += 1
                self._all_streams_at_pass_end()
                if end.last:
                    return
        except BaseException as e:  # noqa: BLE001 - reported by the first stream's thread
            if self._stopping:  # the first stream failed: it reports why
                return
            err = MigrationError(f"data stream {fs.index}: {e}", "memory")
            log.warning("data stream %d failed: %s", fs.index, err)
            self._data_error = err
            if self._pass_end is not None:
                self._pass_end.abort()
            if self.fs is not None:  # unblock the first stream's thread, which reports it
                self.fs.abort(str(err))
                self.fs.close(reset=True)

    def _meet_final_pass(self) -> None:
        """At PREPARE: when every data stream already waits at the end of its last pass (the
        source ends them, empty, before PREPARE), meet them there now and let their threads
        end, so that the final PASS_END inside the pause neither waits for them nor wakes
        them (0.01-0.03 ms there, and their wake-ups took the GIL after it). Otherwise (not
        all there yet) they are met at the final PASS_END, as before."""
        b = self._pass_end
        if b is None or b.parties == 1:
            return
        with self._data_done:
            ready = self._data_last == len(self.data) and b.n_waiting == b.parties - 1
        if not ready:
            return
        self._all_streams_at_pass_end()
        self._met_final = True
        for t in self._data_threads:  # ending now: joined out of the pause
            t.join(self.timeout)

    def _all_streams_at_pass_end(self) -> None:
        """Wait until every stream's receiving thread reached this pass's end."""
        if self._pass_end is None or self._pass_end.parties == 1:
            return
        try:
            self._pass_end.wait(self.timeout)
        except threading.BrokenBarrierError:
            if self._data_error is not None:
                raise self._data_error from None
            raise MigrationError(
                f"not every stream ended pass {self.passes} within {self.timeout} s", "memory"
            ) from None

    def _pages(
        self,
        fs: FrameSocket,
        p: Any,
        written: dict[int, np.ndarray],
        flags: int,
        length: int,
        count: int,
        addr: int,
        check: int,
    ) -> None:
        """A PAGES frame's payload, straight into guest RAM (decompressed when compressed)."""
        r = self._region(p, addr, count)
        off = addr - r.gpa
        target = memoryview(r.mm)[off : off + count * PAGE]
        if flags & COMPRESSED:
            buf = bytearray(length)
            fs.recv_payload_into(memoryview(buf), Frame.PAGES, flags, count, addr, check)
            self._decompress(buf, target)
        else:
            if length != count * PAGE:
                raise MigrationError(
                    f"PAGES frame of {count} pages carries {length} bytes", "memory"
                )
            fs.recv_payload_into(target, Frame.PAGES, flags, count, addr, check)
        written[r.gpa][off // PAGE : off // PAGE + count] = True
        with self._data_done:
            self.pages += count

    def _zero(self, p: Any, written: dict[int, np.ndarray], buf: bytearray) -> None:
        for gpa, n in unpack_zero_runs(bytes(buf)):
            r = self._region(p, gpa, n)
            first = (gpa - r.gpa) // PAGE
            w = written[r.gpa]
            for s, e in mem.runs(w[first : first + n]):
                # a page that held data and is zero now: give its memory back
                punch_hole(r.memfd, r.offset + (first + s) * PAGE, (e - s) * PAGE)
                w[first + s : first + e] = False

    def _region(self, p: Any, gpa: int, pages: int) -> MemoryRegion:
        r = p.gpa_space.find(gpa)
        if r is None or r.readonly or gpa % PAGE or pages <= 0 or gpa + pages * PAGE > r.end:
            raise MigrationError(
                f"the source sent {pages} pages at {gpa:#x}, outside this VM's RAM", "memory"
            )
        return r  # type: ignore[no-any-return]

    def _decompress(self, buf: bytearray, target: memoryview) -> None:
        import zstandard

        dctx = getattr(self._local, "zstd", None)
        if dctx is None:
            dctx = self._local.zstd = zstandard.ZstdDecompressor()
        data = bytes(buf)
        try:
            # decompress() allocates the size the frame header declares, whatever
            # max_output_size says: check it first, or a small frame is a decompression bomb.
            declared = zstandard.frame_content_size(data)
        except Exception as e:  # noqa: BLE001 - zstd's own error type
            raise MigrationError(
                f"a compressed page frame has no valid zstd header: {e}", "memory"
            ) from None
        if declared not in (-1, len(target)):
            raise MigrationError(
                f"a compressed page frame declares {declared} bytes, not {len(target)}", "memory"
            )
        try:
            out = dctx.decompress(data, max_output_size=len(target))
        except Exception as e:  # noqa: BLE001 - zstd's own error type
            raise MigrationError(
                f"a compressed page frame does not decompress: {e}", "memory"
            ) from None
        if len(out) != len(target):
            raise MigrationError(
                f"a compressed page frame gave {len(out)} bytes, not {len(target)}", "memory"
            )
        target[:] = out

    def _typed(self, vm: VirtualMachine, commit: frames.Commit) -> None:
        if commit.serial_input:  # typed at the source during the pause
            vm.uart.feed(commit.serial_input)
            self.serial_input += len(commit.serial_input)

    def resumed(self, vm: VirtualMachine | None = None, running_since: float | None = None) -> None:
        """The VPs run here (since `running_since`, monotonic): tell the source (which then
        stops its VM); without two-phase commit, its COMMIT follows with the serial input
        typed there during the pause, fed to `vm`."""
        fs = self.fs
        if fs is None:
            return
        now = running_since or time.monotonic()
        body = frames.Resumed(now, (now - self.t_commit) * 1000, self.parts)
        if self.postcopy is not None:  # over the link of the moment (it may have been cut)
            self.postcopy.send_resumed(body)
            return
        try:
            fs.send_json(Frame.RESUMED, body)
        except OSError as e:
            log.warning("could not tell the source that the VM resumed: %s", e)
            fs.close()
            return
        if self.two_phase or vm is None:
            fs.close()
            return
        # the worker goes on (MigratedIn, Started) while the source's COMMIT comes
        self._commit_reader = threading.Thread(
            target=self._take_commit, args=(fs, vm), name="migration-commit", daemon=True
        )
        self._commit_reader.start()

    def _take_commit(self, fs: FrameSocket, vm: VirtualMachine) -> None:
        try:
            self._typed(vm, fs.expect(Frame.COMMIT, frames.Commit, "commit"))
        except (OSError, MigrationError) as e:
            log.warning("the serial input typed at the source during the pause is lost: %s", e)
        finally:
            fs.close()


#: Page frames after PREPARE that the receiver takes at a real-time priority, at most (256 MiB
#: at 1 MiB a frame): a source that goes on sending is not taking its final pass.
MAX_BOOSTED_FRAMES = 256


def _body(buf: bytearray, kind: type[Any], frame: str, phase: str) -> Any:
    """A control frame's body from the source, checked: a MigrationError naming the field."""
    try:
        return frames.decode(bytes(buf), kind, frame)
    except frames.FrameError as e:
        raise MigrationError(str(e), phase) from None


def _source_still_there(fs: FrameSocket) -> None:
    """Before running a VM the STATE frame committed (a peek, no wait): a source that sent
    ABORT took the VM back, and a connection this side knows is broken leaves it to the source
    (which resumes it, or asks); a source that only closed its side (it died, or holds the VM
    paused in doubt) leaves it here."""
    try:
        if not select.select([fs.sock], [], [], 0)[0]:
            return  # nothing waiting: the source is there, waiting for RESUMED
        if not fs.sock.recv(1, socket.MSG_PEEK):
            fs.sock.send(b"")  # EPIPE if this side's connection is down, not just the peer's
            return
    except OSError as e:
        raise MigrationError(f"the connection to the source was lost ({e})", "commit") from None
    fs.expect(Frame.RESUMED, frames.Empty, "commit")  # an ABORT raises with its reason


MADV_POPULATE_WRITE = 23  # Linux 5.14
_POPULATE_CHUNK = 4 << 20
#: EXTENTS runs kept for populating, at most: a source cannot grow the list without bound (past
#: it runs are left to the receiver's first touch, which backs them as well).
MAX_POPULATE_RUNS = 1 << 16


#: what may follow a STATE frame sent ahead of the last pages (after PREPARE)
_AFTER_STATE = (Frame.PAGES, Frame.ZERO, Frame.PASS_END, Frame.STATE, Frame.ABORT)


class _Populater:
    """Backs the runs pass 1 will fill with memory from a thread of its own, ahead of the
    pages (MADV_POPULATE_WRITE; the receiver then copies into memory that is already there:
    about twice as fast into fresh memfd pages here). Contents are not touched."""

    def __init__(self) -> None:
        self._runs: list[tuple[int, int]] = []  # (host address, bytes)
        self.skipped = 0  # runs past MAX_POPULATE_RUNS
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, p: Any, runs: list[tuple[int, int]]) -> None:
        taken = runs[: max(0, MAX_POPULATE_RUNS - len(self._runs))]
        self.skipped += len(runs) - len(taken)
        for gpa, n in taken:
            r = p.gpa_space.find(gpa)
            self._runs.append((r.host_address + gpa - r.gpa, n * PAGE))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="populate", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        i = 0
        while i < len(self._runs) and not self._stop.is_set():
            addr, size = self._runs[i]
            for off in range(0, size, _POPULATE_CHUNK):
                if self._stop.is_set():
                    return
                if libc.madvise(addr + off, min(_POPULATE_CHUNK, size - off), MADV_POPULATE_WRITE):
                    return  # an older kernel: the receiver's first touch does it
            i += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def listen(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP listening socket for one incoming migration."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(MAX_STREAMS)  # the data streams connect at once: a full backlog costs a 1 s SYN retry
    return s


def _flip_a_bit(ram: list[MemoryRegion]) -> None:
    """Test-only (fault ``tamper``): change one bit in the middle of guest RAM after it arrived."""
    r = ram[0]
    off = r.size // 2 & ~(PAGE - 1)
    r.mm[off] ^= 0x01
