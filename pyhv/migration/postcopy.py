"""Post-copy live migration (Hines and Gopalan, VEE 2009; QEMU's postcopy-ram): the VM runs at
the destination before its memory is there, and a page arrives when something touches it.

Source (:class:`PostcopySource`), once its VPs are paused: POSTCOPY, the NEED runs (the pages
the destination must fetch: all of the source's data for a pure post-copy, the pages dirtied
since the last pass for a hybrid one), STATE. It then serves on the one sealed stream: urgent
requests (REQUEST frames) go ahead of the background push of the NEED pages, frame by frame;
COMMIT once the destination restored; until POSTCOPY_DONE says every page is in, the source
keeps its (paused) copy.

Destination (:class:`PostcopyDestination`): its guest RAM is registered with userfaultfd
(pyhv.memory.userfault) before the state is restored, so any touch of a missing page stops the
toucher: a fault thread asks the source for a NEED page (REQUEST), or installs a zero page for
any other hole (those are zero at the source: never written, or sent as zero); a receiver thread
installs what comes (UFFDIO_COPY) and wakes the waiters. Host threads reading guest RAM through
the GPA space hold the GIL while they fault, so they ask first (GpaSpace.before_access). The
time each waiter waited is its blocktime (p50/p99 and per thread in POSTCOPY_DONE).

RAM at the pause is checked end to end with :func:`digest`: a position-weighted sum of per-page
linear digests in which a zero page counts 0, so the destination adds up what it kept and what
it installed, page by page, in any order, and must reach the source's figure.

A source that dies mid-post-copy loses the VM (its newest memory exists nowhere else): the
destination stops it, saying so. A cut link does not (pyhv.migration.recovery): the faulting
VPs wait, the source reconnects and resumes the migration, the destination tells it what it
still lacks.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pyhv.migration import frames
from pyhv.migration import memory as mem
from pyhv.migration.recovery import (
    RECOVER_TIMEOUT,
    ResumeListener,
    link_options,
    new_migration_id,
    retry_until,
)
from pyhv.migration.stream import (
    Frame,
    FrameSocket,
    MigrationError,
    pack_zero_runs,
    unpack_zero_runs,
)

if TYPE_CHECKING:
    from pyhv.hypervisor.memory import MemoryRegion
    from pyhv.memory.userfault import Userfault
    from pyhv.worker.vm import VirtualMachine

log = logging.getLogger("pyhv.migration")
PAGE = mem.PAGE
WORDS = PAGE // 8
PUSH_PAGES = 64  # a background frame: small, so an urgent page waits at most this much
SEND_BUFFER = 256 << 10  # the source's socket buffer during post-copy (the kernel doubles it)
#: With the urgent channel up no request waits behind the push: its frames and the link's
#: socket buffer may be larger (fewer steps and syscalls per byte; measured, docs/migration.md)
PUSH_PAGES_PREEMPT = 256
SEND_BUFFER_PREEMPT = 1 << 20
#: The destination installs a frame this many pages per hold of its lock, so an urgent page
#: (the other receiver thread) or a fault waits behind one slice, not a whole push frame
INSTALL_PAGES = 64
RUNS_PER_FRAME = 4096
_MASK64 = (1 << 64) - 1
_K = np.random.default_rng(0x5EED_C0FF).integers(1, 1 << 63, WORDS, dtype=np.uint64) | np.uint64(1)
_DIGEST_CHUNK = 1024  # pages per numpy step (4 MiB)


# --- the RAM digest -------------------------------------------------------------------------


def digest(gpa: int, data: bytes | bytearray | memoryview) -> int:
    """The digest of whole pages `data` at `gpa`: sum over pages of (linear page digest) x
    (odd weight of its page number), mod 2^64. Zero pages add 0; sums of disjoint parts add."""
    total = 0
    view = memoryview(data).cast("B")
    pages = len(view) // PAGE
    for c in range(0, pages, _DIGEST_CHUNK):
        n = min(_DIGEST_CHUNK, pages - c)
        w = np.frombuffer(view[c * PAGE : (c + n) * PAGE], dtype=np.uint64).reshape(n, WORDS)
        d = (w * _K).sum(axis=1, dtype=np.uint64)
        idx = np.arange(gpa // PAGE + c, gpa // PAGE + c + n, dtype=np.uint64)
        weight = idx * np.uint64(0x9E3779B97F4A7C15) | np.uint64(1)
        total += int((d * weight).sum(dtype=np.uint64))
    return total & _MASK64


def region_digest(r: MemoryRegion, mask: np.ndarray | None = None) -> int:
    """digest() of the region's data pages (holes are zero and not read), only those in
    `mask` if given."""
    total = 0
    for a, b in mem.data_extents(r):
        if mask is None:
            total += digest(r.gpa + a * PAGE, memoryview(r.mm)[a * PAGE : b * PAGE])
            continue
        for s, e in mem.runs(mask[a:b]):
            gpa = r.gpa + (a + s) * PAGE
            total += digest(gpa, memoryview(r.mm)[(a + s) * PAGE : (a + e) * PAGE])
    return total & _MASK64


def hexdigest(value: int) -> str:
    return f"{value & _MASK64:016x}"


def percentiles(ms: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) of `ms`, 0 for none."""
    if not ms:
        return 0.0, 0.0, 0.0
    a = np.asarray(ms)
    return (
        round(float(np.percentile(a, 50)), 3),
        round(float(np.percentile(a, 99)), 3),
        round(float(a.max()), 3),
    )


# --- the source -----------------------------------------------------------------------------


class PostcopySource:
    """Serves one post-copy from the paused source VM (see the module docstring)."""

    def __init__(
        self,
        fs: FrameSocket,
        regions: list[MemoryRegion],
        need: list[np.ndarray],
        *,
        reconnect: Callable[[], tuple[FrameSocket, list[tuple[int, int]], Any]] | None = None,
        recover_timeout: float = RECOVER_TIMEOUT,
        preempt: Callable[[], FrameSocket] | None = None,
    ) -> None:
        self.fs = fs
        self.regions = regions
        self.need = [m.copy() for m in need]  # bits clear as pages go out
        #: what the destination may ever lack (a MISSING run outside it is refused)
        self.original = [m.copy() for m in need]
        self.migration = new_migration_id()
        #: one attempt at a new link after a cut (pyhv.migration.recovery.reconnect_source);
        #: None: a cut link ends the migration
        self.reconnect = reconnect
        self.recover_timeout = recover_timeout
        self.recoveries = 0
        self.on_recovered: Callable[[], object] | None = None
        self._committed = False
        #: opens the urgent channel (pyhv.migration.recovery.connect_urgent), or None
        self.preempt = preempt
        self.urgent: FrameSocket | None = None
        self.channel_pages = 0  #: pages sent on request over the urgent channel
        self._urgent: collections.deque[tuple[int, int]] = collections.deque()
        self._urgent_up = threading.Event()  # the urgent channel connected, or gave up
        #: serve() began (the VM paused for good): only then are requests answered, never
        #: with a page the running VM could still change
        self._serving = threading.Event()
        self._linked = False
        self._wide = False  # the link's push in PUSH_PAGES_PREEMPT frames (the urgent channel up)
        self._wake = threading.Event()
        self.restored = threading.Event()
        self.done: frames.PostcopyDone | None = None
        self.resumed: frames.Resumed | None = None
        self.error: BaseException | None = None
        self.urgent_pages = 0
        self.pushed_pages = 0
        self.requests = 0
        #: frames from the destination refused (a REQUEST outside RAM or too long, on the
        #: link or the urgent channel; a POSTCOPY_DONE or RESUMED out of its bounds)
        self.frames_refused = 0

    def announce(self) -> int:
        """POSTCOPY and the NEED runs (before STATE). Returns the pages needed."""
        fs = self.fs
        fs.send_json(Frame.POSTCOPY, frames.Postcopy(self.migration))
        runs = [
            (r.gpa + a * PAGE, b - a)
            for r, m in zip(self.regions, self.need, strict=True)
            for a, b in mem.runs(m)
        ]
        _send_runs(fs, Frame.NEED, runs)
        return sum(int(m.sum()) for m in self.need)

    def need_more(self, pages: list[np.ndarray]) -> int:
        """More NEED runs (before the pause or in it): per region the sorted page indices
        written since the runs sent so far (those needed already are left out). Returns the
        pages needed."""
        runs = []
        for r, m, o, ix in zip(self.regions, self.need, self.original, pages, strict=True):
            ix = ix[~m[ix]] if ix.size else ix
            m[ix] = True
            o[ix] = True
            runs += [(r.gpa + a * PAGE, b - a) for a, b in mem.index_runs(ix)]
        _send_runs(self.fs, Frame.NEED, runs)
        return sum(int(np.count_nonzero(m)) for m in self.original)

    def ready(self, timeout: float = 5.0) -> None:
        """Before the pause, once the destination said PREPARED (its RAM registered, its
        listener up): the link's reader started, and the urgent channel connected, its
        handshake out of the pause (waited for up to `timeout`; without it requests go on
        the link)."""
        self._link(self.fs)
        self._open_urgent()
        if self.preempt is not None:
            self._urgent_up.wait(timeout)

    def serve(self, commit: Any, deadline: float) -> None:
        """Until the destination has every page (POSTCOPY_DONE) and runs (RESUMED): urgent
        pages first, then the push; `commit()` sends COMMIT once the destination restored."""
        if not self._linked:  # (ready() does it before the pause)
            self._link(self.fs)
            self._open_urgent()
        self._serving.set()
        cursor = [(i, 0) for i in range(len(self.regions))]
        while self.done is None or self.resumed is None:
            if self.error is not None:
                if not (self._committed and self.reconnect and isinstance(self.error, OSError)):
                    raise self.error
                self._recover(self.error)  # or MigrationError: the VM stays paused here
                cursor = [(i, 0) for i in range(len(self.regions))]
                continue
            try:
                self._step(commit, deadline, cursor)
            except OSError as e:  # the link: the reader may not have noticed yet
                if self.error is None:
                    self.error = e

    def _step(self, commit: Any, deadline: float, cursor: list[tuple[int, int]]) -> None:
        """One thing to do: COMMIT, an urgent run, a push frame, or wait."""
        if not self._committed and self.restored.is_set():
            self._committed = True  # sent or not: from here the destination may run the VM
            commit()
            return
        if not self._committed and time.monotonic() > deadline:
            raise MigrationError("the destination did not restore the VM in time", "restore")
        if self._urgent:
            gpa, n = self._urgent.popleft()
            self.urgent_pages += self._send_run(gpa, n, urgent=True)
            return
        if cursor and self._committed:  # no push while the destination restores (downtime)
            ri, at = cursor[0]
            m = self.need[ri]
            rest = m[at:]
            k = int(rest.argmax()) if rest.size else 0  # the first needed page, not all of them
            if not rest.size or not rest[k]:
                cursor.pop(0)
                return
            a = at + k
            b = min(a + self._push_pages(), m.size)
            r = self.regions[ri]
            for s, e in mem.runs(m[a:b]):
                self.pushed_pages += self._send_run(r.gpa + (a + s) * PAGE, e - s)
            cursor[0] = (ri, b)
            return
        self._wake.wait(0.1)
        self._wake.clear()

    def _push_pages(self) -> int:
        """Pages a push step sends: more, in a larger socket buffer, while the urgent channel
        carries the requests; few, in a small one, while they share the link with the push."""
        wide = self.urgent is not None
        if wide != self._wide:
            size = SEND_BUFFER_PREEMPT if wide else SEND_BUFFER
            self.fs.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            self._wide = wide
        return PUSH_PAGES_PREEMPT if wide else PUSH_PAGES

    def _link(self, fs: FrameSocket) -> None:
        """Serve on `fs` from now on: its own reader thread."""
        self._linked = True
        self.fs = fs
        self.error = None
        link_options(fs.sock)
        # An urgent page waits behind whatever push the socket holds: keep that short.
        fs.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self._wide = False
        reader = threading.Thread(
            target=self._read, args=(fs,), name="postcopy-requests", daemon=True
        )
        reader.start()

    def _recover(self, cause: BaseException) -> None:
        """The link was cut after COMMIT: keep every page, reconnect, RESUME, and serve what
        the destination says it still lacks (pyhv.migration.recovery)."""
        assert self.reconnect is not None
        self.fs.close(reset=True)
        self.close()  # the urgent channel belongs to the cut link's session
        why = f"the link to the destination was lost ({cause})"
        log.warning(
            "post-copy: %s: the VM stays paused here with all its pages; reconnecting for up "
            "to %g s",
            why,
            self.recover_timeout,
        )
        deadline = time.monotonic() + self.recover_timeout
        got = retry_until(deadline, self.reconnect, why)
        fs, runs, _ack = cast("tuple[FrameSocket, list[tuple[int, int]], Any]", got)
        need = [np.zeros(r.pages, dtype=bool) for r in self.regions]
        for gpa, n in runs:
            at = self._inside(gpa, n)
            first = (gpa - self.regions[at].gpa) // PAGE if at is not None else 0
            if at is None or not self.original[at][first : first + n].all():
                fs.close(reset=True)
                raise MigrationError(
                    f"the destination says it lacks {n} pages at {gpa:#x}, which it never "
                    "needed or lie outside the VM's RAM: refused",
                    "recover",
                )
            need[at][first : first + n] = True
        self._urgent.clear()  # the destination sends its outstanding requests again
        self.need = need
        self.recoveries += 1
        log.warning(
            "post-copy resumed over a new link: the destination lacks %d pages",
            sum(int(m.sum()) for m in need),
        )
        self._link(fs)
        self._open_urgent()
        if self.on_recovered is not None:
            self.on_recovered()

    def _region_at(self, gpa: int) -> int | None:
        """The index of the region holding `gpa`, or None."""
        return next((i for i, r in enumerate(self.regions) if r.gpa <= gpa < r.end), None)

    def _inside(self, gpa: int, n: int) -> int | None:
        """The index of the region holding the whole run of `n` pages at `gpa` (page-aligned,
        n > 0): None for a run from the peer that is not one."""
        at = self._region_at(gpa)
        if at is None or gpa % PAGE or n <= 0 or gpa + n * PAGE > self.regions[at].end:
            return None
        return at

    def _open_urgent(self) -> None:
        if self.preempt is not None:
            threading.Thread(target=self._serve_urgent, name="postcopy-urgent", daemon=True).start()

    def close(self) -> None:
        """The post-copy is over (or failed): the urgent channel goes too."""
        self._serving.set()
        urgent = self.urgent
        if urgent is not None:
            urgent.close()

    def _send_run(
        self, gpa: int, n: int, urgent: bool = False, fs: FrameSocket | None = None
    ) -> int:
        """The needed pages of [gpa, gpa+n): data as PAGES, zero pages as ZERO, on `fs` (the
        link by default). A page may go twice (urgently and pushed): the destination keeps
        the first."""
        fs = fs or self.fs
        at = self._region_at(gpa)
        if at is None:
            return 0
        r, m = self.regions[at], self.need[at]
        first = (gpa - r.gpa) // PAGE
        sub = m[first : first + n].copy()
        if urgent:  # a page the destination waits for goes even if the push sent it (in flight)
            sub[:] = True
        arr = mem.pages_array(r)
        sent = 0
        for s, e in mem.runs(sub):
            a, b = first + s, first + e
            nz = mem.nonzero_pages(arr, a, b)
            zero = [(r.gpa + (a + zs) * PAGE, ze - zs) for zs, ze in mem.runs(~nz)]
            if zero:
                fs.send(Frame.ZERO, pack_zero_runs(zero), count=len(zero))
            for ds, de in mem.runs(nz):
                # sent from where the pages lie (the paused VM's RAM does not change), not
                # copied first; the view is let go at once (an mmap with views cannot close)
                data = memoryview(r.mm)[(a + ds) * PAGE : (a + de) * PAGE]
                try:
                    fs.send(Frame.PAGES, data, count=de - ds, addr=r.gpa + (a + ds) * PAGE)
                finally:
                    data.release()
            m[a:b] = False
            sent += b - a
        return sent

    def _read(self, fs: FrameSocket) -> None:
        try:
            while self.done is None or self.resumed is None:
                ftype, _flags, _count, _addr, payload = fs.recv()
                if ftype is Frame.REQUEST:
                    self._urgent.extend(self._requested(payload))
                elif ftype is Frame.RESTORED:
                    self.restored.set()
                elif ftype is Frame.RESUMED:
                    self.resumed = frames.decode(payload, frames.Resumed, "RESUMED")
                elif ftype is Frame.POSTCOPY_DONE:
                    self.done = frames.decode(payload, frames.PostcopyDone, "POSTCOPY_DONE")
                else:
                    raise MigrationError(
                        f"unexpected {ftype.name} frame during post-copy", "postcopy"
                    )
                self._wake.set()
        except frames.FrameError as e:
            self._failed(fs, self._refused(MigrationError(str(e), "postcopy")))
        except (OSError, MigrationError) as e:  # PeerAborted too: the destination gave up
            self._failed(fs, e)
        self._wake.set()

    def _refused(self, e: MigrationError) -> MigrationError:
        """A frame from the destination refused: counted and logged; the migration fails."""
        self.frames_refused += 1
        log.warning("post-copy: %s", e)
        return e

    def _requested(self, payload: bytes) -> list[tuple[int, int]]:
        """A REQUEST frame's runs, each checked inside RAM."""
        if len(payload) > RUNS_PER_FRAME * 16:  # counted before a list of them is built
            raise self._refused(
                MigrationError(
                    f"a REQUEST of {len(payload) // 16} runs (at most {RUNS_PER_FRAME} a "
                    "frame): refused",
                    "postcopy",
                )
            )
        try:
            runs = unpack_zero_runs(payload)
        except MigrationError as e:
            raise self._refused(e) from None
        for gpa, n in runs:
            if self._inside(gpa, n) is None:
                raise self._refused(
                    MigrationError(
                        f"the destination asked for {n} pages at {gpa:#x}, outside the VM's RAM",
                        "postcopy",
                    )
                )
        self.requests += 1
        return runs

    def _serve_urgent(self) -> None:
        """The urgent channel (QEMU's postcopy-preempt): a second connection on which the
        destination's REQUESTs come and their pages go at once, from this thread, never
        behind the push on the first link. Without it (it could not be opened, or broke)
        requests go over the first link as before."""
        assert self.preempt is not None
        try:  # the destination listens for it from PREPARE on (an older one: once restored)
            fs = cast("FrameSocket", retry_until(time.monotonic() + 5, self.preempt, "", 0.01))
        except MigrationError as e:
            log.warning("post-copy: no urgent channel (%s): requests share the one link", e)
            return
        finally:
            self._urgent_up.set()
        self.urgent = fs
        try:
            link_options(fs.sock)
            self._serving.wait()  # (set by close() too: a switch that failed before it)
            while self.done is None or self.resumed is None:
                ftype, _flags, _count, _addr, payload = fs.recv()
                if ftype is not Frame.REQUEST:
                    raise MigrationError(f"a {ftype.name} frame on the urgent channel", "postcopy")
                try:
                    runs = self._requested(payload)
                except MigrationError as e:  # refused as on the link: the migration fails
                    if self.error is None:
                        self.error = e
                    self._wake.set()
                    raise
                for gpa, n in runs:
                    self.channel_pages += self._send_run(gpa, n, urgent=True, fs=fs)
        except (OSError, MigrationError, frames.FrameError) as e:
            if self.done is None:  # the destination re-sends outstanding requests on the link
                log.warning("post-copy: the urgent channel ended: %s", e)
        finally:
            if self.urgent is fs:
                self.urgent = None
            fs.close()

    def _failed(self, fs: FrameSocket, e: BaseException) -> None:
        if fs is self.fs and self.error is None:  # an old link's reader ends unheard
            self.error = e


# --- the destination ------------------------------------------------------------------------


class PostcopyDestination:
    """Fetches the missing pages of a VM that already runs here (see the module docstring)."""

    def __init__(
        self,
        fs: FrameSocket,
        device: int | None = None,
        *,
        migration: str = "",
        resume_at: tuple[tuple[str, int], bytes] | None = None,
        recover_timeout: float = RECOVER_TIMEOUT,
        timeout: float = 30.0,
    ) -> None:
        self.fs = fs  #: the link to the source (the newest, after a recovery)
        self.up = True  #: the link works (False: waiting for the source to come back)
        self.migration = migration  #: the id POSTCOPY named (a RESUME must name it)
        #: (the migration's listening address, the token): where the source comes back
        self.resume_at = resume_at
        self.recover_timeout = recover_timeout
        self.timeout = timeout
        self.recoveries = 0
        self._resuming = False
        self._generation = 0  # links so far: a wait for the source ends when a new one came
        self._listener: ResumeListener | None = None
        self._resumed_body: frames.Resumed | None = None
        #: the urgent channel: REQUESTs go and their pages come on it (None: on the link)
        self.urgent: FrameSocket | None = None
        self.urgent_channels = 0
        self.device = device  # /dev/userfaultfd passed by the owner, or None: the syscall
        self._runs: list[tuple[int, int]] = []  # NEED runs not applied yet
        self._need_runs = 0  # NEED runs so far
        #: the RAM digest is taken (CONFIG's postcopy_checksum): the pages kept and installed
        self.verify = True
        self.uf: Userfault | None = None
        self.vm: VirtualMachine | None = None
        self.regions: list[MemoryRegion] = []
        self.need: list[np.ndarray] = []
        self.present: list[np.ndarray] = []
        self.remaining = 0
        self.checksum = 0
        self.cond = threading.Condition()
        self.committed = threading.Event()
        self.finished = threading.Event()
        self.error: BaseException | None = None
        self._requested: dict[tuple[int, int], float] = {}  # (region, page) -> asked at
        self._waiters: dict[tuple[int, int], list[tuple[str, float]]] = {}
        self.blocktime_ms: list[float] = []
        self.thread_ms: dict[str, float] = {}
        #: the fault thread / the urgent receiver wait for the lock (each flag written by its
        #: thread only): the push's next install slice lets them have it first (Python's lock
        #: is not fair: a thread that releases it and takes it again at once usually wins)
        self._fault_waits = False
        self._urgent_waits = False
        self.faults = 0
        self.requested_pages = 0
        self._stop = threading.Event()
        self._go = threading.Event()  # start(): the link's receiver may read
        self._threads: list[threading.Thread] = []

    def add_need(self, runs: list[tuple[int, int]], ram_pages: int) -> None:
        """NEED runs (each checked inside RAM by the caller); more runs than RAM has pages
        cannot be an honest list and would only grow this one."""
        self._need_runs += len(runs)
        if self._need_runs > ram_pages:
            raise MigrationError(
                f"the source sent more NEED runs ({self._need_runs}) than the VM "
                f"has pages ({ram_pages})",
                "postcopy",
            )
        self._runs += runs
        if self.uf is not None and not self._go.is_set():  # after PREPARE: applied as they come
            self._apply_need(subtract=self.verify)

    def prepare(
        self,
        vm: VirtualMachine,
        regions: list[MemoryRegion],
        written: dict[int, np.ndarray],
        verify: bool = True,
    ) -> None:
        """Before the source pauses (PREPARE), with the NEED runs so far: drop the stale
        copies of needed pages (only where pages came: a fresh memfd has none), take the
        digest of the pages kept (`verify`), register RAM with userfaultfd, start the fault
        thread and the link's receiver (which waits for :meth:`start`), and listen where the
        urgent channel (and a source whose link was cut) comes."""
        from pyhv.memory.userfault import Userfault

        self.vm, self.regions = vm, sorted(regions, key=lambda r: r.gpa)
        self.verify = verify
        self.present = [written[r.gpa].copy() for r in self.regions]
        self.need = [np.zeros(r.pages, dtype=bool) for r in self.regions]
        self._apply_need(subtract=False)  # (the digest below leaves the stale pages out)
        if verify:
            for r, have in zip(self.regions, self.present, strict=True):
                self.checksum += region_digest(r, have)
        self.uf = Userfault(self.device)
        for r in self.regions:
            self.uf.register(r.host_address, r.size)
        p = vm.partition
        assert p is not None
        p.gpa_space.before_access = self.ensure
        t = threading.Thread(target=self._fault_loop, name="postcopy-faults", daemon=True)
        t.start()
        self._threads.append(t)
        self._receiver(self.fs, go=self._go)  # (reads the link once start() lets it)
        if self.resume_at is not None and self.migration:
            try:  # the source comes back here if the link is cut (pyhv.migration.recovery)
                self._listener = ResumeListener(
                    self.resume_at[0],
                    self.resume_at[1],
                    self.migration,
                    self._take,
                    self._attach,
                    self.timeout,
                    self.fs.encrypted,
                )
            except OSError as e:
                log.warning(
                    "post-copy: cannot listen on %s:%d again (%s): a cut link will stop the VM",
                    *self.resume_at[0],
                    e,
                )

    def _apply_need(self, subtract: bool) -> None:
        """The NEED runs not applied yet: marked needed; a page here from a pass is stale:
        its memory dropped, so a touch faults (and with `subtract` its digest, counted among
        the kept pages, taken back out)."""
        from pyhv.memory.manager import punch_hole

        runs, self._runs = self._runs, []
        for gpa, n in runs:
            i, r = self._find(gpa)
            first = (gpa - r.gpa) // PAGE
            self.need[i][first : first + n] = True
            have = self.present[i][first : first + n]
            for s, e in mem.runs(have):
                a, b = first + s, first + e
                if subtract:
                    self.checksum -= digest(r.gpa + a * PAGE, memoryview(r.mm)[a * PAGE : b * PAGE])
                punch_hole(r.memfd, r.offset + a * PAGE, (b - a) * PAGE)
            have[:] = False

    def start(
        self,
        vm: VirtualMachine,
        regions: list[MemoryRegion],
        written: dict[int, np.ndarray],
        verify: bool = True,
    ) -> None:
        """After the pause, before the state is restored: the NEED runs that came since
        :meth:`prepare` applied (all of them, from an older source without PREPARE), the
        receiver started."""
        if self.uf is None:
            self.prepare(vm, regions, written, verify)
        else:
            self._apply_need(subtract=self.verify)
        self.remaining = sum(int(np.count_nonzero(m)) for m in self.need)
        self._go.set()  # the link's frames from here are the post-copy's: its receiver reads
        if self.remaining == 0:
            self._finish()

    def abandon(self) -> None:
        """The arrival failed before the state was restored (the source still has the VM):
        the threads and the listener :meth:`prepare` started stop, RAM is unregistered."""
        if self._go.is_set():
            return
        self._stop.set()
        self.error = self.error or MigrationError("the arrival failed", "postcopy")
        self._go.set()
        if self._listener is not None:
            self._listener.close()
        urgent = self.urgent
        if urgent is not None:
            urgent.close(reset=True)
        if self.uf is not None:
            self.uf.close()

    def _receiver(
        self, fs: FrameSocket, urgent: bool = False, go: threading.Event | None = None
    ) -> None:
        link_options(fs.sock)
        t = threading.Thread(
            target=self._receive,
            args=(fs, urgent, go),
            name="postcopy-urgent" if urgent else "postcopy-pages",
            daemon=True,
        )
        t.start()
        self._threads.append(t)

    def _find(self, gpa: int) -> tuple[int, MemoryRegion]:
        for i, r in enumerate(self.regions):
            if r.gpa <= gpa < r.end:
                return i, r
        raise MigrationError(
            f"the source sent a page at {gpa:#x}, outside this VM's RAM", "postcopy"
        )

    # --- waiting for pages ----------------------------------------------------------------

    def _locate(self, address: int) -> tuple[int, int] | None:
        for i, r in enumerate(self.regions):
            if r.host_address <= address < r.host_address + r.size:
                return i, (address - r.host_address) // PAGE
        return None

    def _want(self, i: int, page: int, who: str, now: float, asks: list[tuple[int, int]]) -> bool:
        """Under the lock: page `page` of region i is touched by `who`. True if it is there
        (or now zero-filled); otherwise the toucher is recorded as waiting for it."""
        if self.present[i][page]:
            return True
        r = self.regions[i]
        assert self.uf is not None
        if not self.need[i][page]:  # a hole that is zero at the source too
            self.uf.zero(r.host_address + page * PAGE, PAGE)
            self.present[i][page] = True
            return True
        self._waiters.setdefault((i, page), []).append((who, now))
        if (i, page) not in self._requested:
            self._requested[(i, page)] = now
            asks.append((r.gpa + page * PAGE, 1))
        return False

    def _ask(self, asks: list[tuple[int, int]]) -> None:
        self.requested_pages += len(asks)
        urgent = self.urgent
        if urgent is not None:
            try:
                _send_runs(urgent, Frame.REQUEST, asks)
                return
            except OSError as e:
                self._urgent_lost(urgent, e)  # its outstanding requests go on the link
                return
        fs = self.fs
        if not self.up:  # recorded in _requested: sent when the source comes back
            return
        try:
            _send_runs(fs, Frame.REQUEST, asks)
        except OSError as e:
            self._link_lost(fs, e)

    def _fault_loop(self) -> None:
        uf = self.uf
        assert uf is not None
        names: dict[int, str] = {}
        try:
            while not self._stop.is_set():
                vm = self.vm
                if vm is not None and vm.end is not None:
                    # Stopped here before every page came (its owner, a guest shutdown): its
                    # waiters must be let go before the VM is torn down, or closing the KVM
                    # VM waits for KVM's async page-fault worker, which waits on this
                    # userfaultfd, which only closes after: a process no signal ends.
                    why = f"the VM ended here before all its pages came ({vm.end.describe()})"
                    self._fail(MigrationError(why, "postcopy"))
                    return
                if not uf.wait(0.05):
                    continue
                faults = uf.read()
                asks: list[tuple[int, int]] = []
                now = time.monotonic()
                self._fault_waits = True
                with self.cond:
                    self._fault_waits = False
                    for f in faults:
                        self.faults += 1
                        at = self._locate(f.address)
                        if at is None:
                            continue
                        who = names.get(f.tid) or names.setdefault(f.tid, _thread_name(f.tid))
                        if self._want(at[0], at[1], who, now, asks):
                            uf.wake(f.address, PAGE)
                    self.cond.notify_all()  # (a push install may have let this go first)
                if asks:
                    self._ask(asks)
        except BaseException as e:  # noqa: BLE001 - the VM cannot go on without its pages
            self._fail(e)

    def ensure(self, gpa: int, n: int) -> None:
        """GpaSpace.before_access: the pages of [gpa, gpa+n) are there before a host thread
        (which holds the GIL, so the fault thread could not serve it) touches them."""
        if self.finished.is_set() or n <= 0:
            return
        who = threading.current_thread().name
        t0 = time.monotonic()
        waiting: list[tuple[int, int]] = []
        asks: list[tuple[int, int]] = []
        with self.cond:
            for page_gpa in range(gpa & ~(PAGE - 1), gpa + n, PAGE):
                try:
                    i, r = self._find(page_gpa)
                except MigrationError:
                    continue
                page = (page_gpa - r.gpa) // PAGE
                if not self._want(i, page, who, t0, asks):
                    waiting.append((i, page))
        if asks:
            self._ask(asks)
        if waiting:
            with self.cond:
                if not self.cond.wait_for(
                    lambda: self.error is not None or all(self.present[i][p] for i, p in waiting),
                    60.0 + self.recover_timeout,
                ):
                    raise MigrationError(f"post-copy: pages at {gpa:#x} did not come in time")
            if self.error is not None:
                raise MigrationError(f"post-copy failed: {self.error}")

    # --- pages coming in --------------------------------------------------------------------

    def _receive(
        self, fs: FrameSocket, urgent: bool = False, go: threading.Event | None = None
    ) -> None:
        if go is not None:  # started ahead, out of the pause: reads once the state came
            go.wait()
            if self.error is not None:
                return
        # One buffer for this thread's frames, grown as needed (fresh memory per frame costs
        # its page faults): a frame's pages are installed (copied) before the next is read.
        store = bytearray(PUSH_PAGES_PREEMPT * PAGE)
        try:
            while True:  # until the source closes the stream (after POSTCOPY_DONE and RESUMED)
                ftype, flags, length, count, addr, check = fs.recv_header()
                if length > len(store):
                    store = bytearray(length)
                buf = memoryview(store)[:length]
                fs.recv_payload_into(buf, ftype, flags, count, addr, check)
                if ftype is Frame.PAGES:
                    if flags or length != count * PAGE or count <= 0:
                        raise MigrationError(
                            f"a post-copy PAGES frame of {count} pages carries {length} bytes",
                            "postcopy",
                        )
                    self._install(addr, count, buf, urgent)
                elif ftype is Frame.ZERO:
                    for gpa, n in unpack_zero_runs(bytes(buf)):
                        self._install(gpa, n, None, urgent)
                elif urgent:  # pages only, on the urgent channel
                    raise MigrationError(f"a {ftype.name} frame on the urgent channel", "postcopy")
                elif ftype is Frame.COMMIT:
                    self.committed.set()
                elif ftype is Frame.ABORT:
                    reason = bytes(buf).decode(errors="replace")
                    raise MigrationError(f"the source aborted: {reason}", "postcopy")
                else:
                    raise MigrationError(
                        f"unexpected {ftype.name} frame during post-copy", "postcopy"
                    )
        except OSError as e:  # the link, not the source's word: it may come back
            if urgent:
                self._urgent_lost(fs, e)
            else:
                self._link_lost(fs, e)
        except BaseException as e:  # noqa: BLE001 - reported and the VM stopped
            self._fail(e)

    def _install(self, gpa: int, n: int, data: memoryview | None, urgent: bool = False) -> None:
        """Pages [gpa, gpa+n) from the source (`data`, or zero pages for None), on the urgent
        channel or not: the ones still missing installed, their waiters woken, INSTALL_PAGES
        per hold of the lock."""
        i, r = self._find(gpa)
        first = (gpa - r.gpa) // PAGE
        if gpa % PAGE or n <= 0 or gpa + n * PAGE > r.end:
            raise MigrationError(
                f"the source sent {n} pages at {gpa:#x}, outside this VM's RAM", "postcopy"
            )
        addr = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data)) if data else 0
        for c in range(0, n, INSTALL_PAGES):
            self._install_slice(i, r, first, c, min(c + INSTALL_PAGES, n), data, addr, urgent)
        if self.remaining == 0 and not self.finished.is_set():
            self._finish()

    def _install_slice(
        self,
        i: int,
        r: MemoryRegion,
        first: int,
        c: int,
        d: int,
        data: memoryview | None,
        addr: int,
        urgent: bool,
    ) -> None:
        """Pages first+c .. first+d of region i, of a frame whose pages start at `first`
        (`data` at host address `addr`)."""
        uf = self.uf
        assert uf is not None
        if urgent:
            self._urgent_waits = True
        with self.cond:
            if urgent:
                self._urgent_waits = False
            elif self._urgent_waits or self._fault_waits:  # theirs first (a VP waits on them)
                self.cond.wait_for(lambda: not (self._urgent_waits or self._fault_waits), 0.01)
            want = self.need[i][first + c : first + d] & ~self.present[i][first + c : first + d]
            for s, e in mem.runs(want):
                s, e = s + c, e + c  # within the frame
                host = r.host_address + (first + s) * PAGE
                size = (e - s) * PAGE
                if data is None:
                    ok = uf.zero(host, size)
                else:
                    if self.verify:
                        gpa_s = r.gpa + (first + s) * PAGE
                        self.checksum += digest(gpa_s, data[s * PAGE : e * PAGE])
                    ok = uf.copy(host, addr + s * PAGE, size)
                if not ok:  # cannot happen while we own the holes; never leave a waiter
                    uf.wake(host, size)
                self.present[i][first + s : first + e] = True
                self.remaining -= e - s
                if self._requested:  # (every waiter's page is requested: none waits otherwise)
                    self._woken(i, first + s, first + e)
            self.cond.notify_all()

    def _woken(self, i: int, lo: int, hi: int) -> None:
        """Under the lock, pages lo..hi of region i just installed: their requests are
        answered and their waiters' blocktimes taken (only the pages somebody asked for are
        looked at: a few, against a whole frame's)."""
        if hi - lo > len(self._requested):
            hits = [k for k in self._requested if k[0] == i and lo <= k[1] < hi]
        else:
            hits = [(i, p) for p in range(lo, hi) if (i, p) in self._requested]
        if not hits:
            return
        # read under the lock, after the install: a waiter registered after a time read
        # outside it would get a negative blocktime (and POSTCOPY_DONE be refused)
        now = time.monotonic()
        for key in hits:
            del self._requested[key]
            for who, t in self._waiters.pop(key, ()):
                ms = (now - t) * 1000
                self.blocktime_ms.append(ms)
                self.thread_ms[who] = self.thread_ms.get(who, 0.0) + ms

    def _finish(self) -> None:
        """Every needed page is in: tell the source (it may let its copy go) and stop
        catching faults (a hole left is a zero page, which the kernel fills)."""
        self.finished.set()
        p50, p99, mx = percentiles(self.blocktime_ms)
        done = frames.PostcopyDone(
            hexdigest(self.checksum) if self.verify else "",
            self.faults,
            self.requested_pages,
            p50,
            p99,
            mx,
            {
                k[: frames.MAX_THREAD_NAME]: round(v, 3)
                for k, v in sorted(self.thread_ms.items())[: frames.MAX_BLOCKTIME_THREADS]
            },
            self.recoveries,
            self._listener.refused if self._listener is not None else 0,
            self.urgent_channels,
        )
        self.summary = done
        self._stop.set()
        if self.vm is not None and self.vm.partition is not None:
            self.vm.partition.gpa_space.before_access = None
        threading.Thread(target=self._close_uffd, name="postcopy-close", daemon=True).start()
        fs = self.fs
        if not self.up:  # sent when the source comes back
            return
        try:
            fs.send_json(Frame.POSTCOPY_DONE, done)
        except OSError as e:
            log.warning("post-copy: could not tell the source all pages are in: %s", e)
            self._link_lost(fs, e)

    def _close_uffd(self) -> None:
        for t in self._threads:
            if t is not threading.current_thread() and t.name == "postcopy-faults":
                t.join(5)
        if self.uf is not None:
            self.uf.close()

    def _fail(self, e: BaseException) -> None:
        """The source is gone or broke the stream: the VM's newest memory is lost with it."""
        if self.error is not None:
            return
        self.error = e
        with self.cond:
            self.cond.notify_all()
        log.error("post-copy failed: %s: the VM is stopped (its memory is incomplete)", e)
        self._stop.set()
        if self._listener is not None:
            self._listener.close()
        urgent = self.urgent
        if urgent is not None:
            urgent.close(reset=True)
        vm = self.vm
        if self.uf is not None:
            self.uf.close()  # the waiters go on with zero pages: stop the VM right away
        if vm is not None:
            vm.stop(f"post-copy failed: {e} (the source held the rest of its memory)")

    # --- a cut link (pyhv.migration.recovery) ---------------------------------------------

    def _link_lost(self, fs: FrameSocket, e: BaseException) -> None:
        """`fs` failed. Before COMMIT, or without a way back, that fails the post-copy; after
        it the VM runs on (its VPs wait on missing pages) while the source comes back."""
        with self.cond:
            if fs is not self.fs or not self.up or self.error is not None:
                return  # an old link, or noticed already
            self.up = False
            generation = self._generation
            urgent, self.urgent = self.urgent, None  # of the cut link's session
        fs.close(reset=True)
        if urgent is not None:
            urgent.close(reset=True)
        clean = isinstance(e, ConnectionError) and not isinstance(e, ConnectionResetError)
        if self.finished.is_set() and (clean or self._listener is None):
            # the source closed it after POSTCOPY_DONE and RESUMED: it has let its copy go
            if self._listener is not None:
                self._listener.close()
            return
        if not self.committed.is_set() or self._listener is None:
            self._fail(e)
            return
        log.warning(
            "post-copy: the link to the source was lost (%s): the VM runs on, its VPs wait "
            "on missing pages; waiting up to %g s for the source to come back",
            e,
            self.recover_timeout,
        )
        threading.Thread(
            target=self._await_source, args=(generation, e), name="postcopy-await", daemon=True
        ).start()

    def _await_source(self, generation: int, cause: BaseException) -> None:
        with self.cond:
            if self.cond.wait_for(
                lambda: self._generation != generation or self.error is not None,
                self.recover_timeout,
            ):
                return
        if self.finished.is_set():  # every page is in: only the source does not know
            log.warning("post-copy: the source did not come back to hear that all pages are in")
            if self._listener is not None:
                self._listener.close()
            return
        self._fail(
            MigrationError(
                f"the link to the source was lost ({cause}) and the source did not come back "
                f"within {self.recover_timeout:g} s",
                "recover",
            )
        )

    def _take(self, fs: FrameSocket) -> str | None:
        """ResumeListener: `fs` is an authenticated stream whose RESUME named this migration.
        None: it is the link from now on (after MISSING, RESUME_ACK, the outstanding
        REQUESTs); otherwise why it is refused."""
        with self.cond:
            if self.error is not None:
                return "the post-copy here has failed"
            if self.up:
                return "the source is connected: a second source is refused"
            if self._resuming:
                return "another resume of this migration is in progress"
            self._resuming = True
        try:
            # Under the lock no page comes in (there is no link) and no request is taken:
            # what is sent is exactly what is missing and asked for; anything after goes on
            # the new link.
            with self.cond:
                missing = [
                    (r.gpa + a * PAGE, b - a)
                    for r, need, have in zip(self.regions, self.need, self.present, strict=True)
                    for a, b in mem.runs(need & ~have)
                ]
                _send_runs(fs, Frame.MISSING, missing)
                fs.send_json(
                    Frame.RESUME_ACK,
                    frames.ResumeAck(sum(n for _g, n in missing), len(missing)),
                )
                asked = self._outstanding()
                _send_runs(fs, Frame.REQUEST, asked)
                if self._resumed_body is not None:
                    fs.send_json(Frame.RESUMED, self._resumed_body)
                if self.finished.is_set():
                    fs.send_json(Frame.POSTCOPY_DONE, self.summary)
                self.fs, self.up = fs, True
                self.recoveries += 1
                self._generation += 1
                self.cond.notify_all()
            log.warning(
                "post-copy resumed over a new link: %d pages missing, %d requested",
                sum(n for _g, n in missing),
                len(asked),
            )
            self._receiver(fs)
            return None
        except OSError as e:
            return f"the new link failed at once: {e}"
        finally:
            self._resuming = False

    def _attach(self, fs: FrameSocket) -> str | None:
        """ResumeListener: `fs` (authenticated, PREEMPT naming this migration) becomes the
        urgent channel; otherwise why it is refused."""
        with self.cond:
            if self.error is not None or self.finished.is_set():
                return "the post-copy here is over"
            if not self.up:
                return "the link is down: the source resumes first"
            if self.urgent is not None:
                return "an urgent channel is attached already"
            self.urgent = fs
            self.urgent_channels += 1
        log.info("post-copy: urgent channel attached")
        self._receiver(fs, urgent=True)
        return None

    def _urgent_lost(self, fs: FrameSocket, e: BaseException) -> None:
        """The urgent channel ended: requests go on the link again, the outstanding ones
        first (those asked on the channel may be lost with it)."""
        with self.cond:
            if self.urgent is not fs:
                return
            self.urgent = None
            asked = self._outstanding()
        fs.close(reset=True)
        if self.finished.is_set() or self.error is not None:
            return
        log.warning("post-copy: the urgent channel ended (%s): requests go on the link", e)
        link = self.fs
        if self.up and asked:
            try:
                _send_runs(link, Frame.REQUEST, asked)
            except OSError as err:
                self._link_lost(link, err)

    def _outstanding(self) -> list[tuple[int, int]]:
        """Under the lock: the pages asked for and not yet in, as REQUEST runs."""
        return [(self.regions[i].gpa + page * PAGE, 1) for i, page in sorted(self._requested)]

    def send_resumed(self, body: frames.Resumed) -> None:
        """RESUMED (the VPs run here), now if the link is up, else when the source is back."""
        self._resumed_body = body
        fs = self.fs
        if not self.up:
            return
        try:
            fs.send_json(Frame.RESUMED, body)
        except OSError as e:
            self._link_lost(fs, e)

    def wait_commit(self, timeout: float) -> None:
        """COMMIT (read by the receiver thread), or MigrationError."""
        deadline = time.monotonic() + timeout
        while not self.committed.wait(0.05):
            if self.error is not None:
                raise MigrationError(f"post-copy: {self.error}", "commit")
            if time.monotonic() > deadline:
                raise MigrationError("the source did not commit in time", "commit")


def _send_runs(fs: FrameSocket, ftype: Frame, runs: list[tuple[int, int]]) -> None:
    """`runs` as (gpa, pages) frames of `ftype`, RUNS_PER_FRAME a frame."""
    for c in range(0, len(runs), RUNS_PER_FRAME):
        chunk = runs[c : c + RUNS_PER_FRAME]
        fs.send(ftype, pack_zero_runs(chunk), count=len(chunk))


def _thread_name(tid: int) -> str:
    """The name of this process's thread `tid` (a VP's thread: vp0, ...)."""
    for t in threading.enumerate():
        if t.native_id == tid:
            return t.name
    try:  # not ours: KVM's async page-fault worker (a kworker), when this pid namespace sees it
        with open(f"/proc/{tid}/comm") as f:
            return f"tid {tid} ({f.read().strip()})"
    except OSError:
        return f"tid {tid}"
