"""Smart Paging, as the VMMS runs it: a VM that restarts when the host's pool cannot give it its
startup memory starts anyway, the part the host lacks backed by a file on disk (the Smart
Paging file, ``vms/NAME/smart-paging.slp`` under the state directory), until Dynamic Memory has
ballooned the guest down far enough for the rest to fit the pool; then its pages move into host
memory and the file goes.

As in Hyper-V, it is used only at a restart (`pyhv vm restart`; a plain start on a short host
is refused as before), only for a VM with Dynamic Memory whose minimum is below its startup
memory, and only for what ballooning to the minimum can end: the host must give at least the
VM's minimum. The VMMS opens the file and the worker inherits the fd (a jailed worker reaches no
path of the state directory). The worker's memory cgroup limit stays at the VM's assigned
memory, the file excluded: the kernel writes the file's pages back and drops them from the page
cache under that limit, which is what makes them paged rather than resident.

The end: a thread of its own looks every LOOK_S at each VM on Smart Paging. While the pool is
short of the pages still in the file, it asks Dynamic Memory to take the VM to its target (its
demand plus buffer, at least its minimum) at once, as an administrator's target, instead of the
balancer's lazy trim (minutes): Hyper-V ends Smart Paging as soon as it can. Once the pool's free
memory covers the pages still in the file it holds the balancer (no tick hands that memory out
meanwhile), raises the worker's cgroup limit, asks the worker to move the pages (the VPs pause
for the copy), waits for the status that shows them assigned, and deletes the file.

A VM on Smart Paging is not migrated: `begin_migration` refuses it with the reason (its memory
state is not saved while part of it lives in a file of this host).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyhv.memory.manager import PAGE_SIZE
from pyhv.memory.smartpaging import ALIGN
from pyhv.vmms.config import VmSettings
from pyhv.vmms.inventory import Conflict
from pyhv.worker.boot import ram_regions
from pyhv.worker.config import format_size

log = logging.getLogger(__name__)

FILE_NAME = "smart-paging.slp"
MIB_PAGES = (1 << 20) // PAGE_SIZE
#: How often the VMMS looks whether a VM's Smart Paging can end.
LOOK_S = 0.5
#: How long the end waits for the status that shows the moved pages assigned.
STATUS_WAIT_S = 5.0
#: Seconds between two targets sent to a VM on Smart Paging (the guest answers in between).
TARGET_EVERY_S = 5.0
#: Hyper-V expects Smart Paging to last minutes at most: past this, a warning each minute.
WARN_AFTER_S = 300.0


@dataclass
class _InUse:
    path: Path
    size: int
    started_at: float
    worker: Any
    memory: Any = None  # pyhv.vmms.claims.WorkerMemory, once the worker runs
    ending: bool = False
    failures: int = 0
    targeted_at: float = 0.0
    warned_at: float = 0.0
    fd: int = -1  # ours, until the worker has started with its own


@dataclass
class _Ended:
    after_s: float
    copied_bytes: int
    paused_us: int


class SmartPaging:
    """The VMMS's Smart Paging: plan at a restart, the file, the end, the figures."""

    def __init__(self, vm_dir: Path, service: Any, dm_vms: Callable[[], Mapping[str, Any]]) -> None:
        self.vm_dir = Path(vm_dir)
        self._service = service  # pool, balancer, dm_counters
        self._dm_vms = dm_vms  # {name: (MemorySettings, DM port)} of the balanced VMs
        self._in_use: dict[str, _InUse] = {}
        self._ended: dict[str, _Ended] = {}
        self._lock = threading.Lock()
        self.ends = 0
        self.end_failures = 0

    # --- start -------------------------------------------------------------------------

    def plan(self, settings: VmSettings, restart: bool, free_pages: int) -> int:
        """Bytes of startup memory the file must back for `settings` to start now (0: the
        pool has it all); Conflict saying why when Smart Paging cannot cover the gap."""
        free = free_pages * PAGE_SIZE
        startup = settings.memory
        if startup <= free:
            return 0
        name = settings.name
        short = (
            f"VM {name!r} cannot start: the host's pool has {format_size(free)} free, less than "
            f"its startup memory {format_size(startup)}"
        )
        if not restart:
            return 0  # as in Hyper-V, a start from off is refused (the pool says by how much)
        if not settings.dynamic_memory or settings.minimum >= startup:
            raise Conflict(
                f"{short}; Smart Paging needs Dynamic Memory with a minimum below startup (it "
                f"ends when the guest is ballooned down): `pyhv vm memory {name} --dynamic "
                "--minimum SIZE`"
            )
        size = -(-(startup - free) // ALIGN) * ALIGN
        if startup - size < settings.minimum:
            raise Conflict(
                f"{short}; the host can give it {format_size(startup - size)}, below its "
                f"minimum {format_size(settings.minimum)}: ballooning could not end Smart "
                "Paging; free memory first"
            )
        top = ram_regions(startup)[-1][1]
        if size >= top:
            raise Conflict(
                f"{short}; Smart Paging backs at most the top RAM region ({format_size(top)}), "
                f"not {format_size(size)}: free memory first"
            )
        return size

    def open_file(self, name: str, size: int) -> tuple[int, Path]:
        """Create the VM's Smart Paging file of `size` bytes (sparse): its fd and path.
        OSError says why not."""
        d = self.vm_dir / name
        d.mkdir(mode=0o700, exist_ok=True)
        path = d / FILE_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        return fd, path

    def give_file(self, name: str, size: int, worker: Any) -> None:
        """Before the VM's worker starts: its Smart Paging file, whose fd the worker inherits
        (`worker.smart_paging`, pyhv.worker.process); the VM counts as on Smart Paging from
        now (its worker's statuses may name the file's pages)."""
        fd, path = self.open_file(name, size)
        worker.smart_paging = (fd, size)
        with self._lock:
            self._in_use[name] = _InUse(path, size, time.monotonic(), worker, fd=fd)
            self._ended.pop(name, None)

    def started(self, name: str, memory: Any) -> None:
        """The worker runs with its copy of the fd: ours is closed; `memory` (its enforced
        memory, pyhv.vmms.claims.WorkerMemory) has its cgroup limit raised before the pages
        move in."""
        with self._lock:
            use = self._in_use.get(name)
            if use is None:
                return
            use.memory = memory
            fd, use.fd = use.fd, -1
        if fd >= 0:
            os.close(fd)
        log.warning(
            "VM %s started on Smart Paging: %s of its startup memory in %s until Dynamic "
            "Memory makes room in the host's pool",
            name,
            format_size(use.size),
            use.path,
        )
        self._counters(name)

    def refuse_status(
        self, name: str, status: Any, worker: Any = None, memory: Any = None
    ) -> str | None:
        """Why a status the VM's worker pushed cannot be true of Smart Paging (None: it can).
        A worker claiming pages in a file it was not given (or more than the file backs)
        would have the pool count less than the host holds for it. A worker this VMMS did
        not start (re-adopted after a VMMS restart) is taken on Smart Paging if its VM's file
        is there: the VMMS made it, a jailed worker cannot."""
        with self._lock:
            use = self._in_use.get(name)
        pages = status.smart_paging_pages
        if pages and use is None and worker is not None:
            use = self._readopt(name, worker, memory)
        if pages and use is None:
            return (
                f"memory status: smart_paging_pages {pages}, but VM {name!r} was given no Smart "
                "Paging file"
            )
        if use is not None and pages > use.size // PAGE_SIZE:
            return (
                f"memory status: smart_paging_pages {pages}, more than the "
                f"{use.size // PAGE_SIZE} pages of VM {name!r}'s Smart Paging file"
            )
        return None

    def _readopt(self, name: str, worker: Any, memory: Any) -> _InUse | None:
        path = self.vm_dir / name / FILE_NAME
        try:
            size = path.stat().st_size
        except OSError:
            return None
        with self._lock:
            use = self._in_use.setdefault(
                name, _InUse(path, size, time.monotonic(), worker, memory)
            )
        log.warning("VM %s: its worker runs on Smart Paging (%s): taken on again", name, path)
        return use

    def gone(self, name: str) -> None:
        """The VM's worker ended (or did not start): its file, if it had one, goes."""
        with self._lock:
            use = self._in_use.pop(name, None)
        if use is None:
            return
        if use.fd >= 0:
            os.close(use.fd)
        with contextlib.suppress(OSError):
            use.path.unlink()
        log.info("VM %s ended on Smart Paging: %s deleted", name, use.path)
        self._service.dm_counters.vm.update(
            {"Smart Paging In Use": 0, "Smart Paging Working Set Size": 0}, name
        )

    def in_use(self, name: str) -> bool:
        with self._lock:
            return name in self._in_use

    # --- the end -----------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(LOOK_S):
            with self._lock:
                names = [n for n, u in self._in_use.items() if not u.ending]
            for name in names:
                try:
                    self._look(name)
                except Exception:  # noqa: BLE001 - one VM's failure must not end the looks
                    log.exception("VM %s: Smart Paging look failed", name)

    def _look(self, name: str) -> None:
        pool, balancer = self._service.pool, self._service.balancer
        self._counters(name)
        status = pool.latest(name)
        with self._lock:
            use = self._in_use.get(name)
        if status is None or use is None:
            return
        self._warn_if_long(name, use, status)
        if status.smart_paging_pages == 0 or pool.free_pages >= status.smart_paging_pages:
            with balancer.paused():  # no tick hands the free memory out while it moves
                self._end(name, use)
        elif status.reported and not status.busy:
            self._trim(name, use, status)

    def _warn_if_long(self, name: str, use: _InUse, status: Any) -> None:
        now = time.monotonic()
        if now - use.started_at < WARN_AFTER_S or now - use.warned_at < 60:
            return
        use.warned_at = now
        log.warning(
            "VM %s has run on Smart Paging for %d min (%s in %s): its demand keeps it above "
            "what the host's pool can give; free memory (stop or shrink other VMs) or lower its "
            "minimum (`pyhv vm memory %s --minimum SIZE`)",
            name,
            (now - use.started_at) // 60,
            format_size(status.smart_paging_pages * PAGE_SIZE),
            use.path,
            name,
        )

    def _trim(self, name: str, use: _InUse, status: Any) -> None:
        """Take the VM to its target now (not after the balancer's lazy-trim delay)."""
        now = time.monotonic()
        if now - use.targeted_at < TARGET_EVERY_S:
            return
        entry = self._dm_vms().get(name)
        if entry is None:
            return
        settings, port = entry
        target = status.target_pages(settings)
        if status.assigned_pages - target < MIB_PAGES:
            return  # at its target: the file stays until other memory frees
        use.targeted_at = now
        try:
            self._service.balancer.request_target(name, port, target)
        except RuntimeError as e:
            log.info("VM %s: Smart Paging could not trim it yet: %s", name, e)
            return
        log.info(
            "VM %s on Smart Paging: ballooned to its target %d MiB now",
            name,
            target // MIB_PAGES,
        )

    def _end(self, name: str, use: _InUse) -> None:
        pool = self._service.pool
        status = pool.latest(name)
        if status is None:
            return
        pages = status.smart_paging_pages
        if pages > pool.free_pages:
            return  # the pool changed since the look
        with self._lock:
            use.ending = True
        t0 = time.monotonic()
        try:
            assigned = pool.assigned_pages(name)
            if use.memory is not None:  # the cgroup first, as for any raise
                use.memory.before_target(assigned + pages, assigned)
            before = pool.received(name)
            result = use.worker.end_smart_paging()
            deadline = time.monotonic() + STATUS_WAIT_S
            while pool.received(name) == before and time.monotonic() < deadline:
                time.sleep(0.01)  # the status pushed after the move (a tick waits meanwhile)
        except (RuntimeError, KeyError, OSError) as e:
            with self._lock:
                use.ending = False
                use.failures += 1
                self.end_failures += 1
            log.warning("VM %s: Smart Paging could not end yet: %s", name, e)
            return
        with self._lock:
            self._in_use.pop(name, None)
            self.ends += 1
            self._ended[name] = _Ended(
                round(t0 - use.started_at, 1),
                int(result.get("copied_bytes", 0)) if isinstance(result, dict) else 0,
                int(result.get("paused_us", 0)) if isinstance(result, dict) else 0,
            )
        with contextlib.suppress(OSError):
            use.path.unlink()
        log.info(
            "VM %s: Smart Paging ended after %.1f s: %d pages into host memory, %s deleted",
            name,
            t0 - use.started_at,
            pages,
            use.path,
        )
        self._counters(name)

    # --- figures -----------------------------------------------------------------------

    def _counters(self, name: str) -> None:
        d = self.describe(name)
        self._service.dm_counters.vm.update(
            {
                "Smart Paging In Use": 1 if d["in_use"] else 0,
                "Smart Paging Working Set Size": d["bytes"] / (1 << 20),
                "Smart Paging File Size": (d["file_bytes"] or 0) / (1 << 20),
            },
            name,
        )

    def describe(self, name: str) -> dict[str, Any]:
        """For `pyhv vm show`: in use or not, the RAM the file backs, its path and what it
        holds on disk; when it has ended, after how long and what the move cost."""
        with self._lock:
            use = self._in_use.get(name)
            ended = self._ended.get(name)
        out: dict[str, Any] = {
            "in_use": use is not None,
            "bytes": 0,
            "file": None,
            "file_bytes": None,
            "since_s": None,
            "ended_after_s": None if ended is None else ended.after_s,
            "moved_bytes": None if ended is None else ended.copied_bytes,
            "paused_us": None if ended is None else ended.paused_us,
        }
        if use is None:
            return out
        status = self._service.pool.latest(name)
        pages = use.size // PAGE_SIZE if status is None else status.smart_paging_pages
        out["bytes"] = pages * PAGE_SIZE
        out["file"] = str(use.path)
        with contextlib.suppress(OSError):
            out["file_bytes"] = use.path.stat().st_blocks * 512
        out["since_s"] = round(time.monotonic() - use.started_at, 1)
        return out


def start_thread(sp: SmartPaging, stop: threading.Event) -> threading.Thread:
    t = threading.Thread(target=sp.run, args=(stop,), name="vmms-smart-paging", daemon=True)
    t.start()
    return t
