"""The source side of a live migration (pre-copy), as Hyper-V does it:

1. connect and authenticate; send the configuration; the destination creates the VM (READY);
2. switch on KVM dirty logging and find what pass 1 sends while the destination builds the VM;
   after READY send all memory (never-written pages are skipped, zero pages go as markers,
   ballooned pages are not sent); with `streams` > 1 every pass goes over that many
   connections, each its own GPA slice of every region from a thread of its own;
3. repeat: take the dirty bitmap and send what was written during the last pass, until what is
   left would be sent within the downtime target at the bandwidth measured, or after
   `max_passes` passes, or once more than `max_sent_multiple` x RAM went out; when the dirty
   set does not shrink, throttle the VPs (paused for a growing share of each interval, like
   QEMU's auto-converge) before going on;
4. PREPARE: the destination gets ready for the pause (its owner's word on the arrival, its
   threads at a real-time priority) and says PREPARED; pause the VPs (this thread and theirs
   real-time meanwhile); send the last dirty pages (on the first stream) and the VP and device
   state (and a checksum of all RAM at pause); the STATE frame commits: the destination restores and checks it and wakes its
   VPs, parked since the VM was built (RESUMED); then COMMIT carries the serial input typed here
   since the state's save, and the source VM is stopped and its memory released. With
   `two_phase_commit` the destination says RESTORED first and runs only at COMMIT (one more
   round trip inside the pause; a connection lost during the restore leaves the VM here).

Any failure before RESUMED resumes the source VM as it was (dirty logging off again) and
raises MigrationError saying in which phase and why; the destination discards everything.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pyhv.migration import dynmem as dm_mod
from pyhv.migration import frames
from pyhv.migration import memory as mem
from pyhv.migration import state as vm_state
from pyhv.migration.dirtylimit import MIN_LIMIT, DirtyLimiter, auto_limit
from pyhv.migration.faults import FaultPlan
from pyhv.migration.realtime import Boost
from pyhv.migration.stream import (
    COMPRESSED,
    MAX_STREAMS,
    Frame,
    FrameSocket,
    MigrationError,
    PeerAborted,
    authenticate_source,
    join_source,
    pack_zero_runs,
    token_bytes,
    warm_up,
)
from pyhv.migration.tracing import trace_dirty_rates, trace_phase

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyhv.hypervisor.memory import MemoryRegion
    from pyhv.worker.vm import VirtualMachine

log = logging.getLogger("pyhv.migration")

PAGE = mem.PAGE
FRAME_PAGES = 256  # 1 MiB of page data per frame
ZERO_RUNS_PER_FRAME = 4096


@dataclass
class MigrationOptions:
    """How to migrate. Sizes in bytes, times in seconds."""

    downtime_target: float = 0.3  #: stop the passes once the rest fits in this
    max_passes: int = 10  #: Hyper-V stops after 10 passes
    min_passes: int = 1  #: passes before the final one even if the rest already fits
    shrink_factor: float = 0.5  #: a pass "shrinks" the dirty set below this x the last one
    small_final_pages: int = 256  #: a final set this small is not worth another pass
    max_sent_multiple: float = 4.0  #: stop after sending this many times the RAM
    bandwidth: int = 0  #: bytes/s on the wire, 0 = no limit
    compress: bool = False  #: zstd level 1 on page frames (kept only when smaller)
    #: AES-256-GCM over every frame's payload (compressed pages: compress, then encrypt); off,
    #: frames are still authenticated (GMAC), just readable on the wire
    encrypt: bool = False
    auto_converge: bool = True  #: throttle the VPs when the dirty set does not shrink
    throttle_initial: float = 0.2
    throttle_step: float = 0.2
    throttle_max: float = 0.95
    max_downtime: float | None = None  #: give up instead of a longer final pause
    #: Wait for the destination's RESTORED before sending COMMIT (two phases: a connection lost
    #: while the destination restores leaves the VM to the source, at one more round trip of
    #: downtime). Off: the STATE frame commits, the destination runs the VM as soon as it
    #: restored and checked it, and a connection lost from then on is in doubt.
    two_phase_commit: bool = False
    verify: bool = True  #: checksum all RAM at pause, compared by the destination
    prefault: bool = True  #: tell the destination what pass 1 sends, so it backs it ahead
    timeout: float = 30.0  #: seconds any one network operation may take
    #: TCP connections carrying pages (1..16): each sends its own share of guest RAM from a
    #: thread of its own, sealed under keys of its own; the destination receives each on a
    #: thread straight into guest RAM
    streams: int = 1
    #: The connection lost after COMMIT went out, before RESUMED came: resume here (True), or
    #: stay paused and raise MigrationInDoubt so the owner can ask the destination (False).
    resume_in_doubt: bool = True
    #: Post-copy (pyhv.migration.postcopy): the VM runs at the destination before its memory
    #: is all there, pages fetched as it touches them. Until the last page is in, the VM's
    #: memory exists only across both hosts: a source that dies meanwhile loses the VM.
    postcopy: bool = False
    #: With postcopy: pre-copy passes first, post-copy after this many passes or as soon as a
    #: pass stops shrinking the dirty set (hybrid); 0: post-copy right away. From this many
    #: passes on, the switch comes whenever pre-copy's final pause would be longer than a
    #: switch's (`postcopy_switch_downtime`), even if the rest fits the downtime target.
    postcopy_after: int = 0
    #: With postcopy_after: the pause a switch to post-copy takes (s), which a hybrid compares
    #: with pre-copy's expected final pause (the dirty pages over the bandwidth measured);
    #: measured here at 1-3 ms (docs/migration.md, "Post-copy and hybrid")
    postcopy_switch_downtime: float = 0.005
    #: Pages/s each VP may dirty (or "auto": a share of the measured bandwidth, once the passes
    #: stop shrinking): a VP over it sleeps in its own thread, the others run on
    #: (pyhv.migration.dirtylimit). Needs a VM created with the dirty ring; replaces
    #: auto-converge. None: no limit (a VM with the ring still reports each VP's rate).
    dirty_limit: int | str | None = None
    #: With postcopy: how long (s) to try to reconnect after the link was cut once the
    #: destination runs the VM (pyhv.migration.recovery); 0: a cut link ends the migration
    recover_timeout: float = 60.0
    #: With postcopy: page requests and their pages on a second connection of their own
    #: (QEMU's postcopy-preempt), never queued behind the push on the first
    postcopy_preempt: bool = True
    faults: dict[str, str] = field(default_factory=dict)  #: test-only: FaultPlan

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MigrationOptions:
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(d) - known)
        if bad:
            raise MigrationError(f"unknown migration option(s) {bad}: known are {sorted(known)}")
        return cls(**d)

    def __post_init__(self) -> None:
        from pyhv.migration.dirtylimit import parse_limit

        self.dirty_limit = parse_limit(self.dirty_limit)
        s = self.streams
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_STREAMS:
            raise MigrationError(
                f"streams={s!r}: a migration uses 1 to {MAX_STREAMS} connections (e.g. 2)"
            )
        if self.postcopy and s > 1:
            # post-copy's pages and requests go over the first connection only
            raise MigrationError(
                f"postcopy with streams={s}: post-copy uses one connection; "
                "set streams=1 or leave postcopy off"
            )
        for name in ("postcopy", "postcopy_preempt"):  # "no" from an API body is truthy
            if not isinstance(getattr(self, name), bool):
                raise MigrationError(f"{name}={getattr(self, name)!r}: give true or false")
        t = self.recover_timeout
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 <= t <= 86400:
            raise MigrationError(
                f"recover_timeout={t!r}: seconds from 0 (no recovery of a cut post-copy link) "
                "to 86400"
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Progress:
    phase: str = "connect"
    passes: int = 0
    pages_sent: int = 0
    zero_pages: int = 0
    skipped_pages: int = 0  # never written or ballooned: not sent at all
    bytes_sent: int = 0
    ram_pages: int = 0
    dirty_pages: int = 0
    dirty_rate: float = 0.0
    bandwidth: float = 0.0
    expected_downtime: float = 0.0
    throttle_percent: float = 0.0
    downtime: float = 0.0
    #: the part of `downtime` QEMU's STOP and RESUME events measure: from every VP parked to
    #: just before they run at the destination (`downtime` less the pause), pre-copy only
    downtime_events: float = 0.0
    total_time: float = 0.0
    final_pages: int = 0
    #: CLOCK_MONOTONIC of the destination's host when its VPs ran (same host: comparable)
    destination_running_since: float = 0.0
    frames_refused: int = 0  # frames from the destination refused as forged or corrupted
    stream_bytes: list[int] = field(default_factory=list)  # bytes sent on each stream
    #: milliseconds of the downtime: pause, last pages, state, destination restore, resume
    downtime_parts: dict[str, float] = field(default_factory=dict)
    #: threads raised to SCHED_FIFO for the pause: granted, refused (no privilege), per side
    realtime: dict[str, int] = field(default_factory=dict)
    pass_log: list[dict[str, Any]] = field(default_factory=list)
    #: post-copy only: pages needed, sent on request and pushed, faults, blocktime, checksums
    postcopy: dict[str, Any] = field(default_factory=dict)
    #: VMs with the dirty ring (pyhv.migration.dirtylimit): pages/s each VP dirtied over the
    #: last second, pages each dirtied, ms each slept for the limit, its ring-full exits
    vp_dirty_rates: list[float] = field(default_factory=list)
    vp_dirty_pages: list[int] = field(default_factory=list)
    vp_throttled_ms: list[float] = field(default_factory=list)
    vp_burst_max: list[int] = field(default_factory=list)  #: most pages between two sleeps
    dirty_ring_full_exits: list[int] = field(default_factory=list)
    #: times a ring overflowed (then every page counted dirty once): docs/migration.md
    dirty_ring_overflows: int = 0
    dirty_limit: int = 0  #: pages/s per VP in force (0: none)
    dirty_limit_seconds: float = 0.0  #: how long it has been in force

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Throttle:
    """Pauses every VP for `fraction` of each interval (auto-converge), from a thread."""

    RUN = 0.02

    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.fraction = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, fraction: float) -> None:
        self.fraction = fraction
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="migration-throttle", daemon=True
            )
            self._thread.start()

    def _run(self) -> None:
        p = self.vm.partition
        assert p is not None
        while not self._stop.is_set():
            f = self.fraction
            if f > 0:
                try:
                    p.pause()
                    self._stop.wait(self.RUN * f / (1 - f))
                except TimeoutError:
                    pass  # a VP the host did not schedule in time: this round runs unthrottled
                finally:
                    p.resume()  # (cancels a pause not yet taken: never left paused)
            self._stop.wait(self.RUN)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


class MigrationInDoubt(MigrationError):
    """COMMIT may have reached the destination but its answer did not come: the VM may run
    there. The source VM stays paused until its owner decides (resume here, or stop)."""


class Source:
    """One outgoing migration of `vm` (see the module docstring)."""

    def __init__(
        self,
        vm: VirtualMachine,
        address: tuple[str, int],
        token: str | bytes,
        options: MigrationOptions | None = None,
        on_progress: Callable[[dict[str, Any]], object] | None = None,
    ) -> None:
        self.vm = vm
        self.address = address
        self.token = token_bytes(token)
        self.opt = options or MigrationOptions()
        self.on_progress = on_progress
        self.progress = Progress()
        self.faults = FaultPlan(self.opt.faults)
        self.fs: FrameSocket | None = None
        self.data: list[FrameSocket] = []  #: the data streams, after the first one
        self._pool: ThreadPoolExecutor | None = None
        self._count = threading.Lock()  # progress counters, updated by every sending thread
        self._local = threading.local()  # a zstd compressor per sending thread
        self._owner = 0  # the thread that runs the migration (and reports progress)
        self._first_sent = False  # the first stream sent its first page frame
        self._logging: list[MemoryRegion] = []
        self._paused = False
        self._t_parked = 0.0  # monotonic: every VP parked for the final phase
        self._throttle = _Throttle(vm)
        self._limiter: DirtyLimiter | None = None  # a VM with the dirty ring, once logging
        # a held pause (test-only fault "hold") is reported, so a test can act during it
        self.faults.on_hold = lambda phase: self._report(force=True)
        self._t0 = 0.0
        self._last_report = 0.0
        self.ram_checksum: str | None = None
        self._committing = False
        self._postcopy_committed = False  # the VM runs at the destination, its memory here
        self._pc: Any = None  # the PostcopySource once switched
        #: SCHED_FIFO for this thread and the VP threads it parks, during the pause only
        self._boost = Boost()

    # --- the whole thing ----------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Migrate; returns the final progress report. On failure the VM runs on here."""
        self._t0 = time.monotonic()
        self._owner = threading.get_ident()
        try:
            self._migrate()
        except BaseException as e:
            phase = getattr(e, "phase", "") or self.progress.phase
            peer = self._peer_reason(e)
            why = peer or _describe(e)
            if self._postcopy_committed:  # resuming here would run a stale copy: never
                self._hold()
                raise MigrationInDoubt(
                    f"post-copy to {self.address[0]}:{self.address[1]}: {why}: the VM may run at "
                    "the destination with part of its memory still here; it stays paused here",
                    "postcopy",
                ) from e
            # an ABORT is the destination's own word that it does not run the VM
            aborted = isinstance(e, PeerAborted) or peer is not None
            if self._committing and not self.opt.resume_in_doubt and not aborted:
                self._hold()
                raise MigrationInDoubt(
                    f"migration to {self.address[0]}:{self.address[1]}: {why} after COMMIT was "
                    "sent: the VM may be running at the destination; it stays paused here "
                    "until its owner asks the destination",
                    "commit",
                ) from e
            self._roll_back(why)
            raise MigrationError(
                f"migration to {self.address[0]}:{self.address[1]} failed during {phase}: {why}; "
                "the VM keeps running here",
                phase,
            ) from e
        finally:
            self._boost.end()
            if self._limiter is not None:
                self._limiter.stop()
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
            for d in self.data:
                d.close()
            if self.fs is not None:
                self.fs.close()
        return self.progress.as_dict()

    def _phase(self, name: str, paused: bool = False) -> None:
        self.progress.phase = name
        if not paused:  # while paused the owner hears of it after the VPs run again
            self._report(force=True)
        pr = self.progress
        trace_phase(self.vm, "source", name, pr.bytes_sent, pr.pages_sent)

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.fs is not None:
            self.progress.bytes_sent = self._bytes_sent()
            self.progress.stream_bytes = [self.fs.bytes_sent, *(d.bytes_sent for d in self.data)]
            self.progress.frames_refused = self.fs.frames_refused
        self.progress.total_time = now - self._t0
        # paused: only forced reports (a phase change reports once the VPs run again)
        due = not self._paused and now - self._last_report > 0.1
        limiter = self._limiter
        if limiter is not None and (force or due):  # each VP's rate, at the reports' pace
            if self.on_progress is None:
                self._last_report = now
            for k, v in limiter.report().items():
                setattr(self.progress, k, v)
            pr = self.progress
            trace_dirty_rates(self.vm, pr.vp_dirty_rates, pr.dirty_limit, pr.vp_throttled_ms)
        if self.on_progress is not None and (force or due):
            self._last_report = now
            try:
                self.on_progress(self.progress.as_dict())
            except Exception:  # noqa: BLE001 - a listener must not break the migration
                log.exception("migration progress listener failed")

    def _migrate(self) -> None:
        vm, opt = self.vm, self.opt
        p = vm.partition
        if p is None or vm.end is not None:
            raise MigrationError("the VM is not running: nothing to migrate", "connect")
        dm = vm.dynmem
        if opt.postcopy and dm is not None:
            raise MigrationError(
                "post-copy of a VM with Dynamic Memory is not supported (its balloon and VSP "
                "rings are not fetched on demand): migrate it without post-copy",
                "connect",
            )
        if opt.dirty_limit is not None or p.dirty_rings is not None:
            # refused here, before anything, for a VM without the ring (it names the remedy)
            limit = opt.dirty_limit if isinstance(opt.dirty_limit, int) else None
            limiter = DirtyLimiter(p, limit)
        else:
            limiter = None
        if dm is not None:
            dm_mod.quiesce(dm)
            dm_activity = dm_mod.activity(dm)
        # 1. connect, authenticate, configuration
        self._phase("connect")
        # OpenSSL's first key costs ~4 ms here: paid while connecting, not in the handshake
        warm = threading.Thread(target=warm_up, name="migration-warm-up", daemon=True)
        warm.start()
        try:
            sock = socket.create_connection(self.address, timeout=opt.timeout)
        except OSError as e:
            raise MigrationError(
                f"cannot connect to the destination {self.address[0]}:{self.address[1]}: {e}",
                "connect",
            ) from None
        fs = self.fs = FrameSocket(
            sock,
            bandwidth=-(-opt.bandwidth // opt.streams),  # shared by the streams
            timeout=opt.timeout,
            peer="destination",
        )
        self.faults.at("connect", fs)
        warm.join()
        self._phase("authenticate")
        authenticate_source(fs, self.token, opt.encrypt)
        self._phase("config")
        regions = self._ram()
        self.progress.ram_pages = sum(r.pages for r in regions)
        self.faults.at("config", fs)
        fs.send_json(
            Frame.CONFIG,
            frames.Config(
                vm.config.to_dict(),
                [(r.gpa, r.size) for r in regions],
                frames.ConfigOptions(
                    verify=opt.verify,
                    two_phase_commit=opt.two_phase_commit,
                    streams=opt.streams,
                    postcopy_at_once=opt.postcopy and opt.postcopy_after <= 0,
                    postcopy_checksum=opt.verify,
                ),
                None if dm is None else dm_mod.layout(dm),
            ),
        )
        self._join_streams()
        if opt.postcopy and opt.postcopy_after <= 0:
            fs.expect(Frame.READY, frames.Empty, "config")
            self._postcopy(regions, None, "post-copy asked for at once")
            return

        # 2. dirty logging on and pass 1's pages found while the destination builds the VM
        # (a fixed cost of every migration, 15-20 ms here); an ABORT in place of READY rolls
        # back (dirty logging off again)
        t_logging = time.monotonic()
        for r in regions:
            mem.set_dirty_logging(r, True)
            self._logging.append(r)
        if limiter is not None:  # each VP's rate from here on, and the limit if one is set
            self._limiter = limiter
            limiter.start()
        if vm.storage is not None:  # from here its READs into guest pages are sent again
            vm.storage.vsp.begin_dirty_log()
        skip = self._skip_ranges()
        pass1: list[tuple[MemoryRegion, np.ndarray]] = []
        for r in regions:
            mask = np.zeros(r.pages, dtype=bool)
            for a, b in mem.data_extents(r):
                mask[a:b] = True
            sm = mem.skip_mask(r, skip)
            if sm is not None:
                mask &= ~sm
            self.progress.skipped_pages += r.pages - int(mask.sum())
            pass1.append((r, mask))
        # What pass 1 will send: the destination backs it with memory ahead of the pages.
        extents = [(r.gpa + a * PAGE, b - a) for r, m in pass1 for a, b in mem.runs(m)]
        fs.expect(Frame.READY, frames.Empty, "config")

        # first pass: everything
        self._phase("pass1")
        t = time.monotonic()
        sent_before = self._bytes_sent()
        pages = 0
        for i in range(0, len(extents) if opt.prefault else 0, ZERO_RUNS_PER_FRAME):
            chunk = extents[i : i + ZERO_RUNS_PER_FRAME]
            fs.send(Frame.EXTENTS, pack_zero_runs(chunk), count=len(chunk))
        pages += self._send_masks(pass1, first_pass=True)
        self._end_pass(t, sent_before, pages)
        self._pass_started = t_logging  # the dirty log covers pass 1 and the wait for READY

        # 3. iterate
        prev_dirty = None
        while True:
            t_bitmap = time.monotonic()
            masks = [(r, mem.dirty_mask(r)) for r in regions]
            dirty = sum(int(m.sum()) for _, m in masks)
            elapsed = max(t_bitmap - self._pass_started, 1e-6)
            self.progress.dirty_pages = dirty
            self.progress.dirty_rate = dirty / elapsed
            bw = max(self.progress.bandwidth, 1.0)
            expected = dirty * PAGE / bw
            self.progress.expected_downtime = expected
            self._report(force=True)
            fits = expected <= opt.downtime_target
            shrinking = prev_dirty is None or dirty < prev_dirty * opt.shrink_factor
            if fits and self.progress.passes >= opt.min_passes:
                # Within the target already; one more pass pays while it still shrinks the
                # final set a lot (a shorter pause), and stops paying once it does not.
                if dirty <= opt.small_final_pages or not shrinking:
                    why = f"the rest ({dirty} pages) fits the downtime target"
                    break
            if (
                opt.postcopy
                and self.progress.passes >= opt.postcopy_after
                and (not fits or expected > opt.postcopy_switch_downtime)
            ):
                # past the pass limit, the shorter pause: a switch's, unless the rest goes faster
                why = f"{opt.postcopy_after} passes done"
                if fits:
                    why = (
                        f"{why}: the rest ({dirty} pages) would pause the VM "
                        f"{expected * 1000:.1f} ms by pre-copy, longer than a switch to "
                        f"post-copy ({opt.postcopy_switch_downtime * 1000:.1f} ms)"
                    )
                self._postcopy(regions, masks, why)
                return
            if opt.postcopy and not fits and self.progress.passes >= 2 and not shrinking:
                self._postcopy(regions, masks, "the passes stopped shrinking the dirty set")
                return
            if self.progress.passes >= opt.max_passes:
                why = f"{opt.max_passes} passes done"
                break
            ram_bytes = self.progress.ram_pages * PAGE
            if self._bytes_sent() >= opt.max_sent_multiple * ram_bytes:
                why = f"sent {self._bytes_sent() / ram_bytes:.1f} x RAM"
                break
            if (
                opt.dirty_limit == "auto"
                and limiter is not None
                and not fits
                and not shrinking
                and self.progress.passes >= 2
            ):
                # the writers only: a quarter of the link shared by the VPs, halved each time more
                cap = auto_limit(bw, len(p.vps))
                old = limiter.limit
                limiter.set_limit(cap if old is None else max(MIN_LIMIT, min(cap, old // 2)))
            elif (
                opt.auto_converge
                and opt.dirty_limit is None
                and not fits
                and not shrinking
                and self.progress.passes >= 2
            ):
                f = self._throttle.fraction
                f = opt.throttle_initial if f == 0 else min(f + opt.throttle_step, opt.throttle_max)
                self._throttle.set(f)
                self.progress.throttle_percent = round(f * 100, 1)
            prev_dirty = dirty
            self._phase(f"pass{self.progress.passes + 1}")
            t = self._pass_started = time.monotonic()
            sent_before = self._bytes_sent()
            if self.progress.passes == 1:
                self.faults.at("pass2", fs)
            pages = self._send_masks(masks)
            self._end_pass(t, sent_before, pages)
        log.info("%s: final pass: %s", vm.config.name, why)
        if opt.max_downtime is not None and self.progress.expected_downtime > opt.max_downtime:
            raise MigrationError(
                f"did not converge: the guest dirties {self.progress.dirty_rate:.0f} pages/s and "
                f"{self.progress.dirty_pages} pages are left after {self.progress.passes} passes "
                f"(throttle {self.progress.throttle_percent}%), which would take "
                f"{self.progress.expected_downtime:.2f} s paused, above the limit of "
                f"{opt.max_downtime} s",
                "converge",
            )

        # 4. everything ready, pause, last pages, state
        self._prepare()
        vm_state.prepare(vm, destination=False)
        left = [(r, np.flatnonzero(m)) for r, m in masks]  # page indices, ahead of the pause
        fs.expect(Frame.PREPARED, frames.Empty, "prepare")
        t_pause, mark = self._pause_for_good(realtime=True)
        parts = self.progress.downtime_parts
        self._phase("final", paused=True)
        self.faults.at("final", fs)
        final = None  # the last pages, when Dynamic Memory froze them with its state
        dm_state = None
        with ExitStack() as frozen:
            if dm is not None:
                # Freeze the VSP and its channel: the host writes to the rings are not
                # dirty-logged, so the rings go in this pass and nothing may write them after.
                frozen.enter_context(dm.vsp.lock)
                channel = dm.offer.channel
                if channel is not None:
                    frozen.enter_context(channel.frozen())
                if dm_mod.activity(dm) != dm_activity:
                    raise MigrationError(
                        "Dynamic Memory changed the guest's memory during the migration "
                        "(balloon, unballoon or hot-add): migrate again",
                        "final",
                    )
                dm_state = dm_mod.save(dm)
                masks = [(r, m | mem.dirty_mask(r)) for r, m in masks]
                ranges = dm_mod.ring_ranges(dm_state)
                if vm.storage is not None:  # the pages its READs wrote (no dirty log sees it)
                    ranges += [(pfn * PAGE, 1) for pfn in sorted(vm.storage.vsp.take_dirtied())]
                for gpa, n in ranges:
                    for r, m in masks:
                        if r.gpa <= gpa < r.end:
                            first = (gpa - r.gpa) // PAGE
                            m[first : first + n] = True
                final = [(r, np.flatnonzero(m)) for r, m in masks]
            # The state first, the last pages after it: the destination checks and restores
            # the state while this side reads the dirty log and sends the pages (it runs the
            # VM only once they are all in).
            self._phase("state", paused=True)
            self.faults.at("state", fs)
            # Input typed from here on is held at the source and goes with COMMIT.
            state = vm_state.save(vm, dm_state, hold_serial=True)
            mark("state_save")
            if not opt.two_phase_commit:
                # The STATE frame and the last pages are the commit: the destination runs the
                # VM once it has them, restored and checked (one hop, not three); a refusal
                # comes back as ABORT.
                self._phase("commit", paused=True)
                self.faults.at("commit", fs)
            fs.send(Frame.STATE, state.encode())
            mark("state")
            # The last pages and PASS_END leave as one burst (the destination wakes once for
            # them, not once per frame).
            _cork(fs, True)
            if final is None:  # dirty when the passes stopped, and since
                final = [(r, mem.union(before, mem.dirty_pages(r))) for r, before in left]
            pages = self._send_final(final)
        self.progress.final_pages = pages
        self.progress.passes += 1
        # From here the destination may run the VM (it waits for this PASS_END, the data
        # streams' final pass ended before the pause: _prepare); until here it cannot.
        self._committing = not opt.two_phase_commit
        fs.send_json(Frame.PASS_END, frames.PassEnd(self.progress.passes, pages, True))
        _cork(fs, False)
        mark("last_pages")
        self._boost.end()  # the rest (checksum, waiting) at the ordinary priority
        self.progress.realtime = self._boost.counts()
        if opt.verify:
            self.ram_checksum = mem.ram_checksum(regions, skip)
            fs.send_json(Frame.CHECKSUM, frames.Checksum(self.ram_checksum))
        if opt.two_phase_commit:
            fs.expect(Frame.RESTORED, frames.Empty, "restore")
            mark("restored")
            self._phase("commit", paused=True)
            self.faults.at("commit", fs)
            self._committing = True  # from here the destination may run the VM
            fs.send_json(Frame.COMMIT, frames.Commit(self._typed()))
        self.faults.at("resumed", fs)
        resumed = fs.expect(Frame.RESUMED, frames.Resumed, "resumed")
        mark("resumed")
        if not opt.two_phase_commit:
            # the VM runs there: what was typed here since the state's save follows it
            try:
                fs.send_json(Frame.COMMIT, frames.Commit(self._typed()))
            except OSError as e:
                log.warning(
                    "%s: serial input typed during the pause is lost: %s", vm.config.name, e
                )
        if resumed.start_ms is not None:
            parts["destination_start"] = round(resumed.start_ms, 2)
        for name, ms in resumed.parts.items():
            if name.startswith("realtime_"):  # the destination's threads raised or not
                # (its word, reported only: a count, whatever it sent; never an error here,
                # after RESUMED)
                n = int(ms) if 0 <= ms < 1 << 16 else -1
                self.progress.realtime[f"destination_{name[9:]}"] = n
            else:
                parts[f"destination_{name}"] = round(ms, 2)
        self._downtime(t_pause, resumed.time)
        self.progress.phase = "done"
        self._report(force=True)
        trace_phase(self.vm, "source", "done", self.progress.bytes_sent, self.progress.pages_sent)

    def _downtime(self, t_pause: float, t_run: float) -> None:
        """The downtime from the pause request (`t_pause`) and from every VP parked (the window
        QEMU's STOP/RESUME events span) to the destination's VPs running (`t_run`, its word)."""
        now = time.monotonic()
        self.progress.destination_running_since = t_run
        # Same host (one CLOCK_MONOTONIC): exact; otherwise bounded by the round trip.
        same_host = t_pause < t_run <= now
        self.progress.downtime = t_run - t_pause if same_host else now - t_pause
        t_parked = self._t_parked
        self.progress.downtime_events = t_run - t_parked if same_host else now - t_parked

    def _pause_for_good(self, realtime: bool = False) -> tuple[float, Callable[[str], None]]:
        """Stop the throttle and pause the VM for the migration's last phase; returns when it
        paused and `mark(step)`, which records the ms since the previous step in the downtime's
        parts (the first step, "pause", already recorded). With `realtime`, this thread runs
        SCHED_FIFO from here until `self._boost.end()`, its VP threads until they parked."""
        vm, p = self.vm, self.vm.partition
        assert p is not None
        self._throttle.stop()
        if vm.end is not None:
            raise MigrationError(f"the VM ended during migration: {vm.end.describe()}", "final")
        vps = list(p.vps.values())
        if realtime:  # a kicked VP thread parks without waiting for a CPU
            self._boost.add()
            for vp in vps:
                self._boost.add(vp.thread)
        t_pause = time.monotonic()
        p.pause()
        self._paused = True
        for vp in vps:  # parked: back to the ordinary priority (resumed as they were)
            self._boost.drop(vp.thread)
        parts = self.progress.downtime_parts
        t_mark = t_pause

        def mark(name: str) -> None:
            nonlocal t_mark
            now = time.monotonic()
            parts[name] = round((now - t_mark) * 1000, 2)
            t_mark = now

        mark("pause")
        self._t_parked = t_mark  # every VP parked: where QEMU's STOP event stands
        return t_pause, mark

    def _postcopy(
        self,
        regions: list[MemoryRegion],
        masks: list[tuple[MemoryRegion, np.ndarray]] | None,
        why: str,
    ) -> None:
        """Everything the switch does not need paused done first (the NEED runs known so far,
        PREPARE: the destination registers its RAM and listens for the urgent channel, which
        connects), then pause, send only what the VM wrote since and the state, and serve the
        destination's pages while the VM runs there (pyhv.migration.postcopy); returns once it
        has them all."""
        from pyhv.migration.postcopy import PostcopySource, hexdigest, region_digest

        vm, opt, fs = self.vm, self.opt, self.fs
        p = vm.partition
        assert fs is not None and p is not None
        log.info("%s: switching to post-copy: %s", vm.config.name, why)
        self._phase("prepare")  # (a failure up to the pause leaves the VM running here)
        if masks is None:  # nothing sent yet: the destination needs all data
            extents = [list(mem.data_extents(r)) for r in regions]
            need = []
            for r, ext in zip(regions, extents, strict=True):
                m = np.zeros(r.pages, dtype=bool)
                for a, b in ext:
                    m[a:b] = True
                need.append(m)
        else:  # dirty when the passes stopped (and what the pause adds, below)
            need = [m for _r, m in masks]
        pc = self._pc = PostcopySource(
            fs,
            regions,
            need,
            reconnect=self._reconnect if opt.recover_timeout > 0 else None,
            recover_timeout=opt.recover_timeout,
            preempt=self._urgent_channel if opt.postcopy_preempt else None,
        )
        self.progress.postcopy = {"migration": pc.migration}
        pc.on_recovered = self._recovered
        try:
            pc.announce()
            vm_state.prepare(vm, destination=False)
            self.faults.at("prepare", fs)
            fs.send_json(Frame.PREPARE, frames.Empty())
            fs.expect(Frame.PREPARED, frames.Empty, "prepare")
            pc.ready()  # its reader, and the urgent channel (its handshake out of the pause)
            if masks is not None:
                # what the guest wrote while the destination prepared: that destination drops
                # those stale pages while this side pauses, not after the pause's NEED runs
                pc.need_more([mem.dirty_pages(r) for r in regions])
            t_pause, mark = self._pause_for_good(realtime=True)
            parts = self.progress.downtime_parts
            self._phase("postcopy", paused=True)
            # Written since the NEED runs: the dirty log's pages (hybrid), or data in what were
            # holes (pure post-copy: one SEEK_DATA a hole, not a walk over every data page)
            if masks is None:
                more = [_new_data(r, ext) for r, ext in zip(regions, extents, strict=True)]
            else:
                more = [mem.dirty_pages(r) for r in regions]
            needed = pc.need_more(more)
            mark("need")
            self.progress.passes += 1
            fs.send(Frame.STATE, vm_state.save(vm, None).encode())
            mark("state")
        except BaseException:
            pc.close()  # (the urgent channel, if it connected)
            raise
        t_switch = time.monotonic()

        def commit() -> None:
            mark("restored")
            self._committing = self._postcopy_committed = True
            fs.send_json(Frame.COMMIT, frames.Empty())
            self._boost.end()
            self.progress.realtime = self._boost.counts()
            self._phase("commit")

        try:
            pc.serve(commit, time.monotonic() + opt.timeout)
        finally:
            self.fs = pc.fs  # the newest link, after a recovery (run() closes it)
            self.fs.frames_refused += pc.frames_refused  # in Frames Refused with the link's own
            pc.close()
        # The source VM never runs again: dirty logging off (a memslot update each region) once
        # the pages are all there, not in the pause nor while the destination's VPs fault
        self._stop_logging()
        # RAM at the pause: the VM here stays paused for good, so it is summed after serving
        if opt.verify:
            self.ram_checksum = hexdigest(sum(region_digest(r) for r in regions))
        done, resumed = pc.done, pc.resumed
        assert done is not None and resumed is not None
        now = time.monotonic()
        self._downtime(t_pause, resumed.time)
        if resumed.start_ms is not None:
            parts["destination_start"] = round(resumed.start_ms, 2)
        for name, ms in resumed.parts.items():  # the destination's word, reported only
            if not name.startswith("realtime_"):
                parts[f"destination_{name}"] = round(ms, 2)
        self.progress.pages_sent += pc.urgent_pages + pc.pushed_pages
        self.progress.postcopy = {
            "migration": pc.migration,
            "recoveries": pc.recoveries,
            "resumes_refused": done.resumes_refused,
            "urgent_channels": done.urgent_channels,
            "switched_because": why,
            "needed_pages": needed,
            "urgent_pages": pc.urgent_pages + pc.channel_pages,
            "urgent_channel_pages": pc.channel_pages,
            "pushed_pages": pc.pushed_pages,
            "requests": pc.requests,
            "faults": done.faults,
            "requested_pages": done.requested_pages,
            "blocktime_p50_ms": done.blocktime_p50_ms,
            "blocktime_p99_ms": done.blocktime_p99_ms,
            "blocktime_max_ms": done.blocktime_max_ms,
            "thread_blocktime_ms": dict(done.thread_blocktime_ms),
            "seconds": round(now - t_switch, 4),
            "checksum_source": self.ram_checksum,
            "checksum_destination": done.checksum,
        }
        if opt.verify and done.checksum != self.ram_checksum:
            raise MigrationError(
                f"guest RAM at the destination differs from the source's at pause (checksum "
                f"{done.checksum} there, {self.ram_checksum} here)",
                "verify",
            )
        self.progress.phase = "done"
        self._report(force=True)
        trace_phase(self.vm, "source", "done", self.progress.bytes_sent, self.progress.pages_sent)

    def _reconnect(self) -> tuple[FrameSocket, list[tuple[int, int]], Any]:
        """One attempt at a new link to the destination for the post-copy (recovery)."""
        from pyhv.migration.recovery import reconnect_source

        opt, pc = self.opt, self._pc
        return reconnect_source(
            self.address,
            self.token,
            pc.migration,
            encrypt=opt.encrypt,
            bandwidth=opt.bandwidth,
            timeout=opt.timeout,
            max_runs=sum(r.pages for r in pc.regions),
        )

    def _urgent_channel(self) -> FrameSocket:
        """The post-copy's urgent channel (QEMU's postcopy-preempt)."""
        from pyhv.migration.recovery import connect_urgent

        opt, pc = self.opt, self._pc
        return connect_urgent(
            self.address, self.token, pc.migration, encrypt=opt.encrypt, timeout=opt.timeout
        )

    def _recovered(self) -> None:
        """The post-copy goes on over a new link: the owner hears of it."""
        pc = self._pc
        self.fs = pc.fs
        self.progress.postcopy["recoveries"] = pc.recoveries
        self._report(force=True)

    def _typed(self) -> bytes:
        """Serial input held since the state's save (at most what one COMMIT carries)."""
        typed = self.vm.uart.take_held()
        if len(typed) > frames.MAX_SERIAL_INPUT:
            log.warning(
                "%s: %d bytes typed during the pause, only the first %d go to the destination",
                self.vm.config.name,
                len(typed),
                frames.MAX_SERIAL_INPUT,
            )
            typed = typed[: frames.MAX_SERIAL_INPUT]
        return typed

    def clean_up(self) -> None:
        """After success: the VM runs on the destination; stop it here (its memory goes)."""
        self.vm.stop(f"migrated to {self.address[0]}:{self.address[1]}")

    def resume_here(self) -> None:
        """After MigrationInDoubt, when the destination does not run the VM: resume it here.
        Not once a post-copy's destination said RESUMED: the VM ran there, this copy is older
        than what the guest did since (resuming it would roll the guest back): it is stopped
        instead. (Without RESUMED the owner's answer rests on the destination's records: a
        destination resumes only once its owner recorded the VM.)"""
        if self._pc is not None and self._pc.resumed is not None:
            log.error("%s: not resumed: it ran at the destination (post-copy)", self.vm.config.name)
            self.vm.stop("post-copy failed after the VM ran at the destination: this copy is stale")
            self.progress.phase = "aborted"
            self._report(force=True)
            return
        self.vm.uart.release_held()
        if self.vm.partition is not None and self.vm.end is None:
            self.vm.partition.resume()
        self._paused = False
        self.progress.phase = "aborted"
        self._report(force=True)

    def _stop_logging(self) -> None:
        """The throttle, the dirty limit and dirty logging off (the VPs keep whatever pause
        they are in)."""
        self._throttle.stop()
        if self._limiter is not None:
            self._limiter.stop()
        for r in self._logging:
            try:
                mem.set_dirty_logging(r, False)
            except Exception:  # noqa: BLE001 - going on with the others
                log.exception("could not switch dirty logging off")
        self._logging.clear()

    def _hold(self) -> None:
        """In doubt: dirty logging and throttle off, the VPs stay paused."""
        self._stop_logging()
        self.progress.phase = "in-doubt"
        self._report(force=True)

    # --- pieces -------------------------------------------------------------------------

    def _ram(self) -> list[MemoryRegion]:
        p = self.vm.partition
        assert p is not None
        return p.ram

    def _skip_ranges(self) -> list[tuple[int, int]]:
        """(gpa, pages) ranges not to send: the guest's balloon and the pages it hot-removed."""
        dm = self.vm.dynmem
        if dm is None:
            return []
        st = dm.save_memory()
        return [(r.start * PAGE, r.count) for r in (*st.ballooned, *st.removed)]

    _pass_started = 0.0

    def _end_pass(self, t: float, sent_before: int, pages: int) -> None:
        assert self.fs is not None
        now = time.monotonic()
        dt = max(now - t, 1e-6)
        nbytes = self._bytes_sent() - sent_before
        self.progress.passes += 1
        if nbytes > (4 << 20) or self.progress.bandwidth == 0:
            self.progress.bandwidth = nbytes / dt
        self._pass_end(pages)
        self.progress.pass_log.append(
            {"pass": self.progress.passes, "pages": pages, "bytes": nbytes, "seconds": round(dt, 4)}
        )
        if self.progress.passes == 1:
            self._pass_started = t
        self._report(force=True)

    def _join_streams(self) -> None:
        """Open the data streams (1..streams-1) to the destination's listener, each sealed
        under its own keys from the first stream's handshake."""
        assert self.fs is not None
        for i in range(1, self.opt.streams):
            try:
                sock = socket.create_connection(self.address, timeout=self.opt.timeout)
            except OSError as e:
                raise MigrationError(
                    f"cannot open data stream {i} to {self.address[0]}:{self.address[1]}: {e}",
                    "streams",
                ) from None
            self.data.append(join_source(self.fs, sock, i))
        if self.data:
            self._pool = ThreadPoolExecutor(len(self.data), thread_name_prefix="migration-out")

    def _bytes_sent(self) -> int:
        assert self.fs is not None
        return self.fs.bytes_sent + sum(d.bytes_sent for d in self.data)

    def _pass_end(self, pages: int) -> None:
        """PASS_END on every stream: the data streams' first (the destination waits for theirs
        before it takes the state that follows the first stream's last one)."""
        assert self.fs is not None
        end = frames.PassEnd(self.progress.passes, pages)
        for d in self.data:
            d.send_json(Frame.PASS_END, end)
        self.fs.send_json(Frame.PASS_END, end)

    def _send_masks(
        self, masks: list[tuple[MemoryRegion, np.ndarray]], first_pass: bool = False
    ) -> int:
        """Send the pages whose mask bit is set (zero pages as markers). Returns the pages
        covered."""
        if not self.data:
            return self._send_shares([[(r, mem.runs(m)) for r, m in masks]], first_pass)
        return self._send_shares(
            self._split([(r, np.flatnonzero(m)) for r, m in masks]), first_pass
        )

    def _prepare(self) -> None:
        """Before the pause: the data streams end their last pass, empty (the final pages go
        on the first stream: no handoff to the sending threads inside the pause, and the
        destination's receiving threads already wait at the final pass's end), and PREPARE
        asks the destination to get ready (its owner's word on the arrival taken ahead, its
        receiver raised); the pause waits for PREPARED."""
        assert self.fs is not None
        self._phase("prepare")
        self.faults.at("prepare", self.fs)
        end = frames.PassEnd(self.progress.passes + 1, 0, True)
        for d in self.data:
            d.send_json(Frame.PASS_END, end)
        self.fs.send_json(Frame.PREPARE, frames.Empty())

    def _send_final(self, pages: list[tuple[MemoryRegion, np.ndarray]]) -> int:
        """The final pass: pages of sorted, distinct page indices per region, all on the first
        stream from this thread (no bool per page inside the pause). Returns pages covered."""
        share = [(r, mem.index_runs(ix)) for r, ix in pages]
        return self._send_shares([share] + [[] for _ in self.data], False)

    def _split(
        self, sets: list[tuple[MemoryRegion, np.ndarray]]
    ) -> list[list[tuple[MemoryRegion, list[tuple[int, int]]]]]:
        """Each stream's share of the pages: stream i the i-th of `streams` parts with as many
        pages each (in GPA order); the destination finishes a pass on every stream before it
        reads the next, so a page may change streams between passes."""
        n = 1 + len(self.data)
        shares: list[list[tuple[MemoryRegion, list[tuple[int, int]]]]] = [[] for _ in range(n)]
        total = sum(len(ix) for _, ix in sets)
        base = 0
        for r, ix in sets:
            for i in range(n):
                a = max(total * i // n - base, 0)
                b = min(total * (i + 1) // n - base, len(ix))
                if a < b:
                    shares[i].append((r, mem.index_runs(ix[a:b])))
            base += len(ix)
        return shares

    def _send_shares(
        self, shares: list[list[tuple[MemoryRegion, list[tuple[int, int]]]]], first_pass: bool
    ) -> int:
        """Send shares[0] on the first stream from this thread, the others on the data streams
        from the pool's threads. Returns the pages covered."""
        assert self.fs is not None
        futures = [
            self._pool.submit(self._send_share, fs, share, False)
            for fs, share in zip(self.data, shares[1:], strict=True)
            if share and self._pool is not None
        ]
        covered, error = 0, None
        try:
            covered = self._send_share(self.fs, shares[0], first_pass)
        except BaseException as e:  # noqa: BLE001 - raised below, once the threads stopped
            error = e
            for d in self.data:  # unblock the sending threads
                d.close(reset=True)
        for f in futures:
            try:
                covered += f.result()
            except BaseException as e:  # noqa: BLE001 - a sending thread's error
                error = error or e
        if error is not None:
            raise error
        return covered

    def _send_share(
        self,
        fs: FrameSocket,
        share: list[tuple[MemoryRegion, list[tuple[int, int]]]],
        first_pass: bool,
    ) -> int:
        return sum(self._send_runs(fs, r, runs, first_pass) for r, runs in share)

    def _send_runs(
        self,
        fs: FrameSocket,
        r: MemoryRegion,
        runs: list[tuple[int, int]],
        first_pass: bool = False,
    ) -> int:
        """Send on `fs` the pages of region r in the (first, end) page runs; zero pages as
        markers. Returns the number of pages covered."""
        arr = mem.pages_array(r)
        view = memoryview(r.mm)
        covered = 0
        zero_runs: list[tuple[int, int]] = []
        zstd = self._compressor()
        mine = threading.get_ident() == self._owner
        for a, b in runs:
            covered += b - a
            zeros, data = mem.zero_split(view, arr, a, b)
            for s, e in zeros:
                zero_runs.append((r.gpa + s * PAGE, e - s))
                with self._count:
                    self.progress.zero_pages += e - s
                if len(zero_runs) >= ZERO_RUNS_PER_FRAME:
                    fs.send(Frame.ZERO, pack_zero_runs(zero_runs), count=len(zero_runs))
                    zero_runs = []
            for s, e in data:
                for c in range(s, e, FRAME_PAGES):
                    n = min(FRAME_PAGES, e - c)
                    nbytes = n * PAGE
                    buf = fs.payload_buffer(nbytes)  # sealed where it lies
                    buf[:] = view[c * PAGE : c * PAGE + nbytes]  # a copy: the guest may write on
                    gpa = r.gpa + c * PAGE
                    if zstd is not None:
                        z = zstd.compress(buf)
                        if len(z) < nbytes:
                            fs.send(Frame.PAGES, z, count=n, addr=gpa, flags=COMPRESSED)
                        else:
                            fs.send(Frame.PAGES, buf, count=n, addr=gpa)
                    else:
                        fs.send(Frame.PAGES, buf, count=n, addr=gpa)
                    with self._count:
                        self.progress.pages_sent += n
                    if mine:
                        if first_pass and not self._first_sent:
                            self._first_sent = True
                            self.faults.at("pass1", fs)
                        self._report()
        if zero_runs:
            fs.send(Frame.ZERO, pack_zero_runs(zero_runs), count=len(zero_runs))
        return covered

    def _compressor(self) -> Any:
        """This thread's zstd compressor (level 1), or None without `compress`."""
        if not self.opt.compress:
            return None
        zstd = getattr(self._local, "zstd", None)
        if zstd is None:
            import zstandard

            zstd = self._local.zstd = zstandard.ZstdCompressor(level=1)
        return zstd

    def _peer_reason(self, e: BaseException) -> str | None:
        """After a failed send: the destination's ABORT frame, if it sent one before closing."""
        if self.fs is None or not isinstance(e, OSError) or isinstance(e, TimeoutError):
            return None
        try:
            self.fs.sock.settimeout(1.0)
            while True:
                self.fs.recv()
        except PeerAborted as aborted:
            return str(aborted)
        except (OSError, MigrationError):
            return None

    def _roll_back(self, why: str) -> None:
        """Leave the source VM running and unchanged."""
        self._boost.end()  # (its VP threads resume at the ordinary priority)
        self._stop_logging()
        self.vm.uart.release_held()  # what was typed during the pause is the guest's here
        if self.vm.partition is not None and self.vm.end is None:
            self.vm.partition.resume()  # also undoes a throttle pause
        self._paused = False
        if self.fs is not None:
            self.fs.abort(f"the source gave up: {why}")
        self.progress.phase = "aborted"
        self._report(force=True)


def _new_data(r: MemoryRegion, extents: list[tuple[int, int]]) -> np.ndarray:
    """Sorted page indices of data found in the holes between `extents` (region r's data
    extents a while ago): pages first written since. Extents only grow while a VM runs
    without Dynamic Memory (nothing punches its RAM), so only the holes are looked at."""
    fd, base = r.memfd, r.offset
    found: list[np.ndarray] = []
    hole = 0
    for a, b in [*extents, (r.pages, r.pages)]:
        pos = hole
        while pos < a:  # the hole [pos, a)
            try:
                start = (os.lseek(fd, base + pos * PAGE, os.SEEK_DATA) - base) // PAGE
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                start = r.pages
            if start >= a:
                break
            end = -(-(os.lseek(fd, base + start * PAGE, os.SEEK_HOLE) - base) // PAGE)
            end = min(end, a)
            found.append(np.arange(start, end))
            pos = end
        hole = b
    return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)


def _cork(fs: FrameSocket, on: bool) -> None:
    """TCP_CORK: hold partial segments until uncorked (full ones still go)."""
    if fs.sock.family in (socket.AF_INET, socket.AF_INET6):
        fs.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1 if on else 0)


def _describe(e: BaseException) -> str:
    if isinstance(e, socket.timeout | TimeoutError):
        return "the destination did not answer in time (timed out)"
    if isinstance(e, BrokenPipeError | ConnectionResetError):
        return f"the connection to the destination was lost ({e})"
    if isinstance(e, ConnectionError):
        return f"the connection to the destination was lost ({e})"
    return str(e) or type(e).__name__


def migrate(
    vm: VirtualMachine,
    address: tuple[str, int],
    token: str | bytes,
    options: MigrationOptions | None = None,
    on_progress: Callable[[dict[str, Any]], object] | None = None,
) -> dict[str, Any]:
    """Live-migrate a running VM to the destination listening at `address`; the VM here is
    stopped once it runs there. Raises MigrationError (the VM runs on here) on failure."""
    src = Source(vm, address, token, options, on_progress)
    result = src.run()
    src.clean_up()
    return result
