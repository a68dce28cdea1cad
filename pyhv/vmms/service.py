"""The Virtual Machine Management Service: one per host. It keeps the VM inventory (stored
configurations), starts each VM in a worker process of its own, watches the workers (a worker
that dies is reported "crashed" with the reason and its memory goes back to the pool; the other
VMs run on), runs the Dynamic Memory balancer and keeps the counters. The HTTP API
(pyhv.vmms.api) only translates requests into these calls.
"""

from __future__ import annotations

import builtins
import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pyhv.counters.dynmem import DynamicMemoryCounters
from pyhv.counters.prometheus import prometheus_text
from pyhv.counters.registry import CounterDef, CounterRegistry, CounterSetDef
from pyhv.counters.worker import WorkerCounters
from pyhv.dynmem.balancer import PAGE_SIZE, BalancerConfig, MemorySettings
from pyhv.dynmem.status import MemoryStatus
from pyhv.memory.manager import MemoryManagerError
from pyhv.vmms.adoption import (
    AdoptedWorker,
    AdoptionError,
    RunDirectory,
    WorkerRecord,
    age,
    alive,
    start_time,
)
from pyhv.vmms.balancing import (
    BalancerLoop,
    DynamicMemoryUnavailable,
    DynamicMemoryWorker,
    dm_port,
)
from pyhv.vmms.cgroup import MemoryCgroup
from pyhv.vmms.claims import WorkerMemory
from pyhv.vmms.config import (
    VmSettings,
    VmSettingsError,
    apply_changes,
    check_name,
    settings_from_dict,
)
from pyhv.vmms.images import ImageDirectory, ImageError
from pyhv.vmms.inventory import (
    CRASHED,
    INCOMING,
    OFF,
    RUNNING,
    STARTING,
    STOPPING,
    Conflict,
    NotFound,
    StorageError,
    VmEntry,
    VmmsError,
    Worker,
    WorkerFactory,
    _Vm,
)
from pyhv.vmms.jailing import JailPolicy, WorkerJails
from pyhv.vmms.pool import HostPool
from pyhv.vmms.resize import ResizeError, ResizeUnavailable, check_size, resize
from pyhv.vmms.smartpaging import SmartPaging
from pyhv.vmms.store import ConfigStore
from pyhv.vmms.tracing import TraceHub, TracingUnavailable
from pyhv.worker.config import ConfigError, VmConfig, format_size, parse_size

log = logging.getLogger(__name__)


#: Hyper-V's own summary set: how many VMs are fine and how many are not.
HEALTH_SET = CounterSetDef(
    "Hyper-V Virtual Machine Health Summary",
    (
        CounterDef("Health Ok", "VMs running normally", "count"),
        CounterDef("Health Critical", "VMs whose worker or guest crashed", "count"),
    ),
    instance_label=None,
)

#: The kernel's figures against the workers' claims (pyhv.vmms.claims).
ENFORCEMENT_SET = CounterSetDef(
    "pyhv Worker Memory Enforcement",
    (
        CounterDef(
            "Claims Disagreements",
            "checks where a worker claimed less memory than the kernel holds for it",
            "count",
        ),
        CounterDef(
            "Memory Limit Kills", "workers the kernel stopped at their memory cgroup limit", "count"
        ),
    ),
    instance_label=None,
)

#: Workers that outlived a VMMS (pyhv.vmms.adoption), as its successor found them.
ADOPTION_SET = CounterSetDef(
    "pyhv Worker Adoption",
    (
        CounterDef("Workers Adopted", "running workers a restarted VMMS took over", "count"),
        CounterDef(
            "Adoptions Refused",
            "recorded workers still running that refused adoption or did not answer",
            "count",
        ),
        CounterDef(
            "Workers Gone", "recorded workers that had ended when the VMMS restarted", "count"
        ),
    ),
    instance_label=None,
)

#: How often the VMMS reads the kernel's figure for every running worker.
CLAIMS_CHECK_S = 1.0


def _worker_process(config: VmConfig, output: Callable[[bytes], None]) -> Worker:
    from pyhv.worker.process import WorkerProcess

    return WorkerProcess(config, output=output)


def _bundled_image() -> str:
    from pyhv.guest_image import image_path

    return str(image_path())


#: Serial output kept per VM for a console that attaches later (it sees the last prompt).
TAIL_BYTES = 4096


class _LimitFirst:
    """A worker's DM port whose targets move its memory cgroup's limit first."""

    def __init__(
        self, port: DynamicMemoryWorker, memory: WorkerMemory, assigned: Callable[[], int]
    ) -> None:
        self._port, self._memory, self._assigned = port, memory, assigned

    def set_memory_target(self, target_bytes: int) -> object:
        try:
            assigned = self._assigned()
        except KeyError:
            assigned = 0
        self._memory.before_target(-(-target_bytes // PAGE_SIZE), assigned)
        return self._port.set_memory_target(target_bytes)


def _size_field(what: str, value: object) -> int:
    """A size from an API body: bytes or a string such as '768M'; VmmsError naming `what`."""
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"{what} must be bytes or a size such as '768M', got {value!r}")
        return parse_size(value)
    except ConfigError as e:
        raise VmmsError(str(e)) from None


class Vmms:
    """The service. Thread-safe: the API calls it from one thread per request."""

    def __init__(
        self,
        state_dir: Path,
        *,
        budget_bytes: int,
        reserve_bytes: int = 0,
        balancer: BalancerConfig | None = None,
        worker_factory: WorkerFactory = _worker_process,
        image_resolver: Callable[[], str] = _bundled_image,
        stop_timeout: float = 10.0,
        migration: Mapping[str, Any] | None = None,
        jail: JailPolicy | None = None,
        images_dir: Path | None = None,
    ) -> None:
        self.store = ConfigStore(state_dir)
        #: The VMs' page files (pagefiles/NAME.pagefile): host files of this host, never copied.
        self.page_files = Path(state_dir) / "pagefiles"
        #: Where VMs' image names are looked up (`image_resolver` gives the bundled guest).
        self.images = ImageDirectory(
            images_dir if images_dir is not None else Path(state_dir) / "images", image_resolver
        )
        #: Workers start jailed (pyhv.worker.jail) with a memory cgroup each, or not (None).
        self.jails = None if jail is None else WorkerJails(state_dir, jail)
        if self.jails is None:
            log.warning(
                "WORKERS RUN WITHOUT A JAIL (--no-jail, or not root): each runs as the VMMS's "
                "own user, can reach vmms.sock, the API token and other VMs' memory; for "
                "development only"
            )
        self.pool = HostPool(budget_bytes, reserve_bytes)
        self.registry = CounterRegistry()
        self.dm_counters = DynamicMemoryCounters(self.registry)
        self.worker_counters = WorkerCounters(self.registry)
        self.health = self.registry.register(HEALTH_SET)
        self.enforcement = self.registry.register(ENFORCEMENT_SET)
        self._disagreements = self._limit_kills = 0
        self.adoption = self.registry.register(ADOPTION_SET)
        self._adoptions = {"Workers Adopted": 0, "Adoptions Refused": 0, "Workers Gone": 0}
        #: Each running worker's adoption socket and record (pyhv.vmms.adoption).
        self.runs = RunDirectory(state_dir)
        #: Set by close(stop_vms=False): the workers run on; their ends are no longer ours.
        self._detached = False
        self.balancer = BalancerLoop(self.pool, self._dm_vms, self.dm_counters, balancer)
        self.traces = TraceHub()  # the flight recorder's watchers (pyhv.vmms.tracing)
        self.balancer.decision_listeners.append(self.traces.decision)
        #: Smart Paging at a restart on a short host (pyhv.vmms.smartpaging).
        self.smart_paging = SmartPaging(self.store.vm_dir, self, self._dm_vms)
        #: Called with (VM name, status) for every memory status the pool took, in the order it
        #: took them, on the worker's reader thread (an experiment's record of every change).
        self.status_listeners: list[Callable[[str, MemoryStatus], object]] = []
        #: Called with a VM's name before it starts; one raising Conflict refuses the start
        #: (the cluster's: a host without a lease, or not the VM's owner, starts nothing).
        self.start_guards: list[Callable[[str], object]] = []
        #: Called with a VM's name after the administrator stopped it (`stop`).
        self.stop_listeners: list[Callable[[str], object]] = []
        self._worker_factory = worker_factory
        self._stop_timeout = stop_timeout
        self._lock = threading.RLock()
        #: VMs being resized (`resize_memory`): the balancer leaves them alone meanwhile.
        self._resizing: set[str] = set()
        self._vms = {name: _Vm(s) for name, s in self.store.load_all().items()}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._update_health()
        from pyhv.vmms.migration import Migrations

        #: Live migration, both directions (keyword arguments of Migrations: listen_host,
        #: incoming_factory, migrator, timeouts).
        self.migrations = Migrations(self, **dict(migration or {}))
        self._readopt_all()

    # --- lifecycle of the service --------------------------------------------------------

    def start_balancer(self) -> None:
        t = threading.Thread(target=self._balance, name="vmms-balancer", daemon=True)
        t.start()
        self._threads.append(t)
        t = threading.Thread(target=self._check_claims, name="vmms-claims", daemon=True)
        t.start()
        self._threads.append(t)
        from pyhv.vmms.smartpaging import start_thread

        self._threads.append(start_thread(self.smart_paging, self._stop))

    def _check_claims(self) -> None:
        """Every CLAIMS_CHECK_S, every running worker's claim against the kernel's figure (a
        guest re-touching ballooned pages pushes no status: only a look finds it)."""
        while not self._stop.wait(CLAIMS_CHECK_S):
            with self._lock:
                running = [vm for vm in self._vms.values() if vm.memory is not None]
            for vm in running:
                self._check_claim(vm)

    def _check_claim(self, vm: _Vm) -> None:
        mem, name = vm.memory, vm.settings.name
        if mem is None:
            return
        try:
            claimed = self.pool.claimed_pages(name)
        except KeyError:
            return
        d = mem.check(claimed)
        if mem.kernel_pages is not None:
            self.pool.record_kernel(name, mem.kernel_pages)
        if d is not None:
            with self._lock:
                self._disagreements += 1
                self._update_health()
            log.warning("VM %s (worker pid %s): claims disagree: %s", name, mem.pid, d.describe())

    def _balance(self) -> None:
        self.balancer.run(self._stop)

    def close(self, stop_vms: bool = True) -> None:
        """Stop balancing and, with `stop_vms`, every running VM. Without, the VMs run on in
        their workers (as Hyper-V's VMMS service stop leaves them) and the next VMMS on this
        state directory adopts them; a worker that cannot outlive us (no adoption socket) is
        stopped either way."""
        self._stop.set()
        with self._lock:
            running = [vm for vm in self._vms.values() if vm.worker is not None]
            if not stop_vms:
                adoptable = [vm for vm in running if self.runs.has(vm.settings.name)]
                running = [vm for vm in running if vm not in adoptable]
                self._detached = True
                for vm in adoptable:
                    log.info(
                        "VM %s runs on in its worker (pid %s) for the next VMMS",
                        vm.settings.name,
                        vm.worker.pid if vm.worker is not None else None,
                    )
        for vm in running:
            self._halt(vm, "the VMMS is shutting down")
        for t in self._threads:
            t.join(5)

    # --- inventory -----------------------------------------------------------------------

    def _get(self, name: str) -> _Vm:
        try:
            check_name(name)
        except VmSettingsError as e:
            raise NotFound(str(e)) from None
        vm = self._vms.get(name)
        if vm is None:
            raise NotFound(f"no VM named {name!r}: `pyhv vm list` shows the VMs")
        return vm

    def _refuse_while_migrating(self, vm: _Vm, what: str) -> None:
        if vm.migration is not None:
            raise Conflict(
                f"VM {vm.settings.name!r} is being migrated (migration {vm.migration}): cannot "
                f"{what} now; wait for the migration to end (GET /api/migrations/{vm.migration})"
            )

    def describe(self, name: str) -> dict[str, Any]:
        with self._lock:
            return self._describe(self._get(name))

    def _describe(self, vm: _Vm) -> dict[str, Any]:
        s = vm.settings
        out: dict[str, Any] = {
            "name": s.name,
            "state": vm.state,
            "reason": vm.reason,
            "pid": vm.worker.pid if vm.worker is not None else None,
            "uptime_s": round(time.monotonic() - vm.started_at, 1) if vm.started_at else None,
            "settings": s.to_dict(),
            "migration": vm.migration,
        }
        if self.pool.holds(s.name):
            visible, assigned, ballooned = self.pool.pages(s.name)
            st = self.pool.latest(s.name) if s.dynamic_memory else None
            demand = None if st is None else st.committed_pages
            out["memory"] = {
                "visible": visible * PAGE_SIZE,
                "assigned": assigned * PAGE_SIZE,
                "ballooned": ballooned * PAGE_SIZE,
                # Hyper-V Manager's Memory Demand and Memory Status (null until the guest reported)
                "demand": None if demand is None else demand * PAGE_SIZE,
                "status": (
                    None if st is None else st.health(s.memory_settings(), self.pool.free_pages)
                ),
                "smart_paging": self.smart_paging.describe(s.name),
            }
        if vm.memory is not None:
            out["enforcement"] = vm.memory.describe()
        if self.jails is not None:
            out["jail_uid"] = self.jails.ids.get(s.name)
        return out

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._describe(vm) for _, vm in sorted(self._vms.items())]

    def create(self, raw: Mapping[str, object]) -> dict[str, Any]:
        try:
            settings = settings_from_dict(raw)
        except VmSettingsError as e:
            raise VmmsError(str(e)) from None
        with self._lock:
            if settings.name in self._vms:
                raise Conflict(f"a VM named {settings.name!r} exists: pick another name")
            self._save(settings)
            vm = self._vms[settings.name] = _Vm(settings)
            return self._describe(vm)

    def update(self, name: str, raw: Mapping[str, object]) -> dict[str, Any]:
        with self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "change its settings")
            self._refuse_while_resizing(name)
            if vm.state in (STARTING, STOPPING):
                raise Conflict(f"VM {name!r} is {vm.state}: try again in a moment")
            try:
                new = apply_changes(vm.settings, raw, running=vm.state == RUNNING)
            except VmSettingsError as e:
                raise VmmsError(str(e)) from None
            # Saved first: a worker never holds limits its stored config does not (an OSError
            # here changes nothing); a refusal by the worker puts the old settings back.
            self._save(new)
            try:
                self._forward_memory_limits(vm, new)
            except Conflict:
                self._save(vm.settings)
                raise
            vm.settings = new
            return self._describe(vm)

    def _save(self, settings: VmSettings) -> None:
        try:
            self.store.save(settings)
        except OSError as e:
            raise StorageError(
                f"VM {settings.name!r}: its settings could not be saved in {self.store.vm_dir} "
                f"({e}): free space there and try again; nothing was changed"
            ) from None

    def _forward_memory_limits(self, vm: _Vm, new: VmSettings) -> None:
        """A running Dynamic Memory VM's worker clamps targets to the range it was given: tell
        it a lowered minimum or raised maximum once the new settings are stored (if the worker
        refuses, the caller restores the old ones)."""
        old = vm.settings
        if vm.worker is None or not new.dynamic_memory:
            return
        if (new.minimum, new.maximum) == (old.minimum, old.maximum):
            return
        set_limits = getattr(vm.worker, "set_memory_limits", None)
        if set_limits is None:
            return  # a worker without the Dynamic Memory wiring has no range to change
        try:
            set_limits(new.minimum, new.maximum)
        except RuntimeError as e:
            raise Conflict(
                f"VM {vm.settings.name!r}: its worker did not take the new Dynamic Memory "
                f"range {format_size(new.minimum)}..{format_size(new.maximum)}: {e}"
            ) from None

    def delete(self, name: str) -> None:
        with self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "delete it")
            if vm.worker is not None:
                raise Conflict(f"VM {name!r} is {vm.state}: stop it first (`pyhv vm stop {name}`)")
            self.store.delete(name)
            del self._vms[name]
            if self.jails is not None:
                self.jails.ids.release(name)
            self._drop_page_file(name)

    # --- running VMs ---------------------------------------------------------------------

    def restart(self, name: str) -> dict[str, Any]:
        """Stop VM `name` if it runs, then start it again: a restart, where Smart Paging may
        cover startup memory the host's pool cannot give (pyhv.vmms.smartpaging)."""
        with self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "restart it")
            running = vm.worker is not None
        if running:
            self._halt(vm, "restarted by the administrator")
        return self.start(name, restart=True)

    def start(self, name: str, *, restart: bool = False) -> dict[str, Any]:
        with self._lock:
            settings = self._get(name).settings
        for guard in self.start_guards:
            guard(name)
        try:
            # Outside the lock: the bundled guest may have to be built first.
            image = self.images.resolve(settings.image)
        except Exception as e:  # noqa: BLE001 - the guest builder says what is missing
            raise Conflict(f"VM {name!r} cannot start: no guest image ({e})") from None
        with self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "start it")
            if vm.worker is not None:
                raise Conflict(f"VM {name!r} is {vm.state} already")
            self._refuse_orphan(name)
            try:
                config = vm.settings.worker_config(image, self.page_file(name))
            except ConfigError as e:
                raise Conflict(f"VM {name!r} cannot start: {e}") from None
            paged = self.smart_paging.plan(vm.settings, restart, self.pool.free_pages)
            try:
                self.pool.admit(name, vm.settings.memory - paged)
            except MemoryManagerError as e:
                raise Conflict(
                    f"VM {name!r} cannot start: not enough host memory for "
                    f"{format_size(vm.settings.memory)} ({e}); Smart Paging covers such a gap "
                    f"only at a restart (`pyhv vm restart {name}`)"
                ) from None
            vm.state, vm.reason, vm.tail = STARTING, "", bytearray()
            worker = self._worker_factory(config, lambda data: self._output(vm, data))
            vm.worker = worker
            self._subscribe(name, worker)
            try:
                if paged:  # the worker inherits the file's fd
                    self.smart_paging.give_file(name, paged, worker)
                cgroup = self._jail(worker, config)
                secret = self._adoptable(name, worker)
                if secret is not None:  # recorded before it is told to boot: never unrecorded
                    worker.on_spawned = (  # type: ignore[attr-defined]
                        lambda: self._record_worker(name, worker, secret, cgroup)
                    )
                worker.start()
            except OSError as e:
                self.smart_paging.gone(name)  # its file, if it was given one
                vm.worker, vm.state, vm.reason = None, CRASHED, f"the worker did not start: {e}"
                self.pool.give_back(name)
                self.runs.delete(name)
                raise Conflict(f"VM {name!r} cannot start: {e}") from None
            overhead = 0 if self.jails is None else self.jails.policy.overhead_bytes
            vm.memory = WorkerMemory(name, worker.pid, cgroup, overhead)
            if paged:
                self.smart_paging.started(name, vm.memory)
            vm.state, vm.started_at = RUNNING, time.monotonic()
            log.info(
                "VM %s started: worker pid %s%s",
                name,
                worker.pid,
                ""
                if cgroup is None
                else f", jailed as uid {self.jails and self.jails.ids.get(name)}",
            )
            self._spawn_watcher(vm, worker)
            self._update_health()
            return self._describe(vm)

    def page_file(self, name: str) -> str:
        """VM `name`'s page file on this host (its directory made here; the worker creates and
        sizes the file, jailed workers get it bound into their jail)."""
        self.page_files.mkdir(mode=0o700, parents=True, exist_ok=True)
        return str(self.page_files / f"{name}.pagefile")

    def _drop_page_file(self, name: str) -> None:
        try:
            (self.page_files / f"{name}.pagefile").unlink(missing_ok=True)
        except OSError as e:
            log.warning("VM %s: its page file could not be removed: %s", name, e)

    def _jail(self, worker: Worker, config: VmConfig) -> Any:
        """Give a worker process its jail and memory cgroup (None without a jail, or for a
        worker that is not a process of ours: a test's stand-in)."""
        if self.jails is None or not hasattr(worker, "jail"):
            return None
        from pyhv.worker.jail import JailError

        try:
            # The network only for a VMMS that may migrate its VMs (a source worker connects
            # to its destination itself): one serving TCP.
            jail = self.jails.jail(
                config.name,
                str(config.image),
                network=self.jails.policy.network,
                page_file=config.page_file or None,
            )
        except JailError as e:
            raise OSError(str(e)) from None
        cgroup = self.jails.cgroup(config.name, config.memory)
        worker.jail, worker.cgroup = jail, cgroup  # type: ignore[attr-defined]
        if config.huge_pages:
            self._huge_ram(worker, jail)
        return cgroup

    @staticmethod
    def _huge_ram(worker: Worker, jail: Any) -> None:
        """Mount the private tmpfs of a `huge_pages` VM for its jailed worker (which cannot),
        owned by the worker's uid; the worker inherits its fd (pyhv.memory.hugeram)."""
        from pyhv.memory.hugeram import HUGE_PAGE, HugeRam
        from pyhv.worker.config import MAX_MEMORY

        worker.huge_ram = HugeRam(  # type: ignore[attr-defined]
            MAX_MEMORY + HUGE_PAGE, owner=(jail.uid, jail.gid)
        )

    # --- workers that outlive the service (pyhv.vmms.adoption) ------------------------------

    def _adoptable(self, name: str, worker: object) -> str | None:
        """Give a worker process its adoption socket and secret (None for a worker that is not
        a process of ours: a test's stand-in)."""
        if not hasattr(worker, "adoption"):
            return None
        secret = secrets.token_urlsafe(32)
        worker.adoption = (self.runs.listen(name), secret)  # type: ignore[attr-defined]
        return secret

    def _record_worker(
        self, name: str, worker: Worker, secret: str, cgroup: Any, incoming: str = ""
    ) -> bool:
        """Record a started worker for the next VMMS (atomically); False if it could not be
        (disk full: the VM runs, but a VMMS restart will not find it)."""
        pid = worker.pid
        started = None if pid is None else start_time(pid)
        if pid is None or started is None:
            return False
        rec = WorkerRecord(
            name,
            pid,
            started,
            str(self.runs.socket_path(name)),
            secret,
            jail_uid=None if self.jails is None else self.jails.ids.get(name),
            cgroup=None if cgroup is None else str(cgroup.path),
            cgroup_version=0 if cgroup is None else cgroup.version,
            incoming=incoming,
        )
        try:
            self.runs.save(rec)
        except OSError as e:
            log.error(
                "VM %s: its worker record could not be saved in %s (%s): it runs, but a VMMS "
                "restart will not adopt it",
                name,
                self.runs.path,
                e,
            )
            return False
        return True

    def _refuse_orphan(self, name: str) -> None:
        """A worker of this VM that refused adoption may still run it: never a second copy."""
        for _, rec, _why in self.runs.load_all():
            if rec is not None and rec.name == name and alive(rec):
                raise Conflict(
                    f"VM {name!r} still runs in a worker this VMMS could not adopt (pid "
                    f"{rec.pid}): stop that process (`kill {rec.pid}`) before starting it again"
                )

    def _readopt_all(self) -> None:
        """Adopt the workers a previous VMMS on this state directory left running; mark the
        VMs of the others off (or forget a VM that left or never arrived), with why."""
        for file, rec, why in self.runs.load_all():
            if rec is None:
                log.warning("skipping worker record %s: %s", file, why)
                continue
            vm = self._vms.get(rec.name)
            if vm is None:
                log.warning(
                    "worker record of VM %s (pid %s), which is not in the inventory: ignored",
                    rec.name,
                    rec.pid,
                )
                if not alive(rec):
                    self.runs.delete(rec.name)
                continue
            try:
                self._readopt(vm, rec)
            except Exception:  # noqa: BLE001 - one VM's trouble must not stop the service
                log.exception("VM %s: adopting its worker failed", rec.name)
        with self._lock:
            self._update_health()

    def _readopt(self, vm: _Vm, rec: WorkerRecord) -> None:
        name = rec.name
        worker = AdoptedWorker(rec, lambda data: self._output(vm, data))
        try:
            worker.start()
        except AdoptionError as e:
            if alive(rec):
                self._adoptions["Adoptions Refused"] += 1
                vm.state = CRASHED
                vm.reason = (
                    f"its worker (pid {rec.pid}) still runs but was not adopted: {e}. This "
                    f"VMMS does not manage it: stop it (`kill {rec.pid}`), then start the VM"
                )
                log.error("VM %s: %s", name, vm.reason)
                return
            self._adoptions["Workers Gone"] += 1
            self._unowned_end(vm, rec, f"its worker (pid {rec.pid}) ended while no VMMS owned it")
            return
        adopted = worker.adopted
        if adopted.end is not None:  # it ended unowned and waited to tell us
            end = adopted.end.to_end()
            worker.close()
            self._adoptions["Workers Gone"] += 1
            self._unowned_end(
                vm,
                rec,
                f"{end.describe()} (while no VMMS owned its worker, pid {rec.pid})",
                failed=end.failed,
                migrated=end.detail.startswith("migrated to "),
            )
            return
        status = adopted.memory
        assigned = vm.settings.memory if status is None else status.assigned_pages * PAGE_SIZE
        self.pool.readmit(name, assigned)
        if status is not None:
            self.pool.record(name, status)
        cgroup = None
        if rec.cgroup is not None:
            cgroup = MemoryCgroup(Path(rec.cgroup), rec.cgroup_version)
        overhead = 0 if self.jails is None else self.jails.policy.overhead_bytes
        with self._lock:
            vm.tail = bytearray(adopted.serial[-TAIL_BYTES:])
            vm.worker = worker
            vm.memory = WorkerMemory(name, rec.pid, cgroup, overhead)
            vm.state, vm.reason = RUNNING, f"adopted (worker pid {rec.pid})"
            vm.started_at = time.monotonic() - age(rec.start_time)  # the worker's own uptime
            if status is not None and vm.memory is not None:
                vm.memory.after_status(status.assigned_pages, status.busy)
        self._subscribe(name, worker)
        self._adoptions["Workers Adopted"] += 1
        log.info(
            "VM %s: adopted its running worker (pid %s, %s; %s owners so far)",
            name,
            rec.pid,
            adopted.state,
            adopted.counters.get("owners"),
        )
        if rec.incoming:
            self.migrations.arrived_before_restart(rec.incoming, name)
            self.runs.update(name, incoming="")
        if adopted.migration is not None or adopted.state == "paused":
            self.migrations.outgoing_before_restart(vm, worker, adopted.migration, adopted.state)
        self._spawn_watcher(vm, worker)

    def _unowned_end(
        self,
        vm: _Vm,
        rec: WorkerRecord,
        why: str,
        *,
        failed: bool = False,
        migrated: bool = False,
    ) -> None:
        """A recorded worker ended while no VMMS owned it: its VM is off (crashed if it
        failed), or gone from the inventory if it left by migration or never arrived."""
        name = rec.name
        if rec.cgroup is not None:
            MemoryCgroup(Path(rec.cgroup), rec.cgroup_version).remove()
        self.runs.delete(name)
        if (migrated and rec.migrating) or rec.incoming:
            why += (
                "; it had migrated away: forgotten here"
                if migrated
                else f"; it arrived by migration {rec.incoming} but never ran here: the "
                "source keeps it, forgotten here"
            )
            log.warning("VM %s: %s", name, why)
            with self._lock:
                del self._vms[name]
                self.store.delete(name)
            return
        vm.state, vm.reason = (CRASHED if failed else OFF), why
        log.warning("VM %s: %s", name, why)

    def _spawn_watcher(self, vm: _Vm, worker: Worker) -> None:
        watcher = threading.Thread(
            target=self._watch, args=(vm, worker), name=f"watch-{vm.settings.name}", daemon=True
        )
        watcher.start()

    def _watch(self, vm: _Vm, worker: Worker) -> None:
        """Wait for the worker's end; a crash is reported with its reason, and the VM's memory
        returns to the pool either way."""
        end = worker.wait()
        if self._detached:
            return  # the service went without its workers: their ends are the next VMMS's
        worker.close()
        assert end is not None
        reason = end.describe()
        if worker.returncode is not None and worker.returncode < 0:
            try:
                reason += f" (killed by {signal.Signals(-worker.returncode).name})"
            except ValueError:
                reason += f" (killed by signal {-worker.returncode})"
            if worker.returncode == -signal.SIGSYS:
                reason += ": a system call outside the worker's seccomp allow-list (audit log)"
        mem = vm.memory
        if mem is not None and mem.oom_kills():
            peak = mem.cgroup.peak() if mem.cgroup is not None else None
            reason += (
                f": the kernel stopped it at its memory cgroup's limit ({mem.limit()} bytes = "
                f"assigned + {mem.overhead} overhead; peak {peak}): its guest used more memory "
                "than it is assigned (such as pages it had ballooned out)"
            )
            with self._lock:
                self._limit_kills += 1
        with self._lock:
            if vm.worker is not worker:
                return
            vm.worker, vm.started_at = None, None
            if mem is not None and vm.memory is mem:
                vm.memory = None
                mem.close()
            vm.state = CRASHED if end.failed else OFF
            vm.reason = reason
            consoles, vm.consoles = vm.consoles, []
            self.runs.delete(vm.settings.name)
            self.pool.give_back(vm.settings.name)
            self._update_health()
        self.smart_paging.gone(vm.settings.name)  # its file, if it ran on one
        self.balancer.forget(vm.settings.name)  # not under our lock: a tick takes it
        self.worker_counters.forget_vm(vm.settings.name)
        if end.failed:
            log.warning("VM %s crashed: %s", vm.settings.name, reason)
        else:
            log.info("VM %s is off: %s", vm.settings.name, reason)
        for c in consoles:
            c(b"")  # end of output: the console connection closes
        self.traces.end(vm.settings.name)  # and so do its trace streams

    def _halt(self, vm: _Vm, why: str) -> None:
        with self._lock:
            worker = vm.worker
            if worker is None:
                return
            incoming = vm.state == INCOMING
            vm.state = STOPPING
        if incoming:  # still listening or receiving: nothing runs yet
            worker.close(0.5)
        worker.stop()
        if worker.wait(self._stop_timeout) is None:
            log.warning(
                "VM %s did not stop within %g s (%s): killing its worker",
                vm.settings.name,
                self._stop_timeout,
                why,
            )
            worker.close(1.0)
        # The watcher records the end; wait for it so the caller sees the VM off.
        deadline = time.monotonic() + self._stop_timeout
        while vm.worker is worker and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self, name: str) -> dict[str, Any]:
        with self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "stop it")
            if vm.worker is None:
                raise Conflict(f"VM {name!r} is {vm.state}, not running")
        self._halt(vm, "stopped by the administrator")
        for listener in self.stop_listeners:
            listener(name)
        with self._lock:
            return self._describe(vm)

    def _update_health(self) -> None:
        states = [vm.state for vm in self._vms.values()]
        self.health.update(
            {
                "Health Ok": sum(s in (STARTING, RUNNING) for s in states),
                "Health Critical": states.count(CRASHED),
            }
        )
        self.enforcement.update(
            {
                "Claims Disagreements": self._disagreements,
                "Memory Limit Kills": self._limit_kills,
            }
        )
        self.adoption.update(dict(self._adoptions))

    # --- for live migration (pyhv.vmms.migration) -----------------------------------------
    # The inventory stays the service's: migration asks for these, never its lock or dict.

    def entry(self, name: str) -> VmEntry | None:
        """The VM named `name`, or None."""
        with self._lock:
            return self._vms.get(name)

    def add_incoming(self, settings: VmSettings, memory: int, migration: str) -> VmEntry:
        """An entry for a VM arriving by live migration (state "incoming"), its `memory`
        bytes taken from the pool; Conflict if the name is taken or the pool is short."""
        name = settings.name
        with self._lock:
            if name in self._vms:
                raise Conflict(
                    f"a VM named {name!r} exists on the destination already: delete or rename it "
                    "there first"
                )
            try:
                self.pool.admit(name, memory)
            except MemoryManagerError as e:
                raise Conflict(
                    f"not enough host memory for {format_size(memory)} on the destination ({e})"
                ) from None
            vm = self._vms[name] = _Vm(settings, state=INCOMING, migration=migration)
            return vm

    def jail_incoming(self, vm: VmEntry, worker: Worker, memory: int) -> None:
        """Jail an incoming migration's worker before it starts (it listens: the network is
        the host's), in a memory cgroup of `memory` + overhead; its pid is known at adopt()."""
        if self.jails is None or not hasattr(worker, "jail"):
            return
        from pyhv.worker.jail import JailError

        s = vm.settings
        try:
            jail = self.jails.jail(
                s.name,
                self.images.resolve(s.image),
                network=True,
                page_file=self.page_file(s.name) if s.page_file_size else None,
            )
        except (JailError, OSError, ImageError) as e:
            raise OSError(f"cannot jail the incoming worker: {e}") from None
        cgroup = self.jails.cgroup(s.name, memory)
        worker.jail, worker.cgroup = jail, cgroup  # type: ignore[attr-defined]
        worker.max_file_bytes = max(memory, s.maximum, s.page_file_size)  # type: ignore[attr-defined]
        if s.huge_pages:
            self._huge_ram(worker, jail)
        vm.memory = WorkerMemory(s.name, None, cgroup, self.jails.policy.overhead_bytes)

    def adoptable_incoming(self, vm: VmEntry, worker: Worker, migration: str) -> None:
        """Give an incoming migration's worker its adoption socket and secret, and the hook
        that makes the arrived VM ours (durably) before it may resume (its Committed)."""
        name = vm.settings.name
        secret = self._adoptable(name, worker)
        if secret is None or not hasattr(worker, "on_committed"):
            return

        def committed(config: dict[str, Any]) -> bool:
            from pyhv.vmms.migration import exit_point_for_tests

            mem = vm.memory
            cgroup = None if mem is None else mem.cgroup
            try:
                self.store.save(vm.settings)
            except OSError as e:
                log.error(
                    "VM %s arrived but its settings could not be saved in %s (%s): it does not "
                    "resume here (the source keeps it)",
                    name,
                    self.store.vm_dir,
                    e,
                )
                self.migrations.refuse_arrival(
                    migration, f"its owner could not record it: saving its settings failed ({e})"
                )
                return False
            if not self._record_worker(name, worker, secret, cgroup, incoming=migration):
                self.migrations.refuse_arrival(
                    migration, "its owner could not record it: writing its run record failed"
                )
                return False
            exit_point_for_tests("committed")
            return True

        worker.on_committed = committed  # type: ignore[attr-defined]

    def console_sink(self, vm: VmEntry) -> Callable[[bytes], None]:
        """Where a worker of `vm` sends its serial output."""
        return lambda data: self._output(vm, data)

    def adopt(self, vm: VmEntry, worker: Worker) -> str:
        """A VM that arrived runs here: its worker is watched like one this service started,
        and its settings are stored. Returns "" or why they could not be (disk full): the VM
        runs and is watched either way, its memory returned when it ends."""
        error = ""
        with self._lock:
            try:
                self.store.save(vm.settings)
            except OSError as e:
                error = (
                    f"VM {vm.settings.name!r} runs here but its settings could not be saved in "
                    f"{self.store.vm_dir} ({e}): it is not in the inventory after a VMMS "
                    "restart unless you free space there and change one of its settings (`pyhv vm memory "
                    f"{vm.settings.name} --buffer N`)"
                )
                log.error("%s", error)
            vm.state, vm.started_at, vm.migration = RUNNING, time.monotonic(), None
            if vm.memory is None:
                overhead = 0 if self.jails is None else self.jails.policy.overhead_bytes
                vm.memory = WorkerMemory(vm.settings.name, None, None, overhead)
            vm.memory.pid = worker.pid
            self._update_health()
        self._spawn_watcher(vm, worker)
        return error

    def remove(self, vm: VmEntry, *, forget_settings: bool) -> bool:
        """Take `vm` out of the inventory (it did not arrive, or it left for another host):
        its memory goes back to the pool; False if it was gone already."""
        with self._lock:
            name = vm.settings.name
            if self._vms.get(name) is not vm:
                return False
            self.pool.give_back(name)
            del self._vms[name]
            if vm.memory is not None:
                vm.memory.close()
                vm.memory = None
            if forget_settings:
                self.store.delete(name)
            self._drop_page_file(name)  # it left (or never arrived): its pages are not here
            self.runs.delete(name)
            self._update_health()
        self.balancer.forget(name)
        return True

    def begin_migration(self, name: str, migration: str) -> tuple[VmEntry, Worker, int]:
        """Mark running VM `name` as migrating (the balancer leaves it alone from its next
        tick on; conflicting requests get 409): its entry, worker and memory in bytes."""
        with self.balancer.paused(), self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "migrate it")
            self._refuse_while_resizing(name)
            if vm.worker is None or vm.state != RUNNING:
                raise Conflict(f"VM {name!r} is {vm.state}: only a running VM can be migrated")
            if self.smart_paging.in_use(name):
                raise Conflict(
                    f"VM {name!r} runs on Smart Paging (part of its memory is in a file of this "
                    "host): migrate it once Dynamic Memory has ended it (`pyhv vm show "
                    f"{name}` says Smart Paging: not in use)"
                )
            vm.migration = migration
            needed = vm.settings.memory
            if self.pool.holds(name):
                needed = max(needed, self.pool.pages(name)[0] * PAGE_SIZE)
            # A VMMS restart mid-way learns from this whether a worker that ended left.
            self.runs.update(name, migrating=True)
            return vm, vm.worker, needed

    def mark_migrating(self, vm: VmEntry, migration: str) -> None:
        """An adopted VM whose worker was migrating it when the previous VMMS went."""
        with self._lock:
            vm.migration = migration

    def end_migration(
        self, vm: VmEntry, *, worker: Worker | None = None, state: str = "", reason: str = ""
    ) -> None:
        """`vm` migrates no more; with `state`, it is in that state now (if `worker` still
        runs it)."""
        with self._lock:
            vm.migration = None
            if state and (worker is None or vm.worker is worker):
                vm.state, vm.reason = state, reason
            if self._vms.get(vm.settings.name) is vm and vm.worker is not None:
                self.runs.update(vm.settings.name, migrating=False)
            self._update_health()

    # --- serial console ------------------------------------------------------------------

    def _output(self, vm: _Vm, data: bytes) -> None:
        """Serial output of a VM (on its worker's reader thread): keep a tail, fan out."""
        with self._lock:
            vm.tail += data
            del vm.tail[:-TAIL_BYTES]
            consoles = list(vm.consoles)
        for c in consoles:
            c(data)

    def attach(self, name: str, output: Callable[[bytes], None]) -> Callable[[], None]:
        """Connect a console: `output` gets the recent tail, then everything the guest prints,
        then b"" when the VM ends. Returns the function that detaches it."""
        with self._lock:
            vm = self._get(name)
            if vm.worker is None:
                raise Conflict(f"VM {name!r} is {vm.state}: start it to use its console")
            vm.consoles.append(output)
            if vm.tail:  # (b"" would mean the end)
                output(bytes(vm.tail))

        def detach() -> None:
            with self._lock:
                if output in vm.consoles:
                    vm.consoles.remove(output)

        return detach

    def trace(
        self,
        name: str,
        out: Callable[[builtins.list[Any] | None], object],
        kinds: frozenset[str] | None = None,
    ) -> Callable[[], None]:
        """Watch running VM `name`'s flight recorder: `out` gets each batch of its events of
        `kinds` (None: all) and None when the VM ends (pyhv.vmms.tracing). Returns the
        function that stops it."""
        with self._lock:
            vm = self._get(name)
            if vm.worker is None:
                raise Conflict(f"VM {name!r} is {vm.state}: start it to trace it")
            worker = vm.worker
        try:
            return self.traces.attach(name, worker, out, kinds)
        except TracingUnavailable as e:
            raise Conflict(str(e)) from None

    def type(self, name: str, data: bytes) -> None:
        """Input for the VM's serial port."""
        with self._lock:
            vm = self._get(name)
            worker = vm.worker
        if worker is None:
            raise Conflict(f"VM {name!r} is {vm.state}: start it to use its console")
        worker.send(data)

    # --- Dynamic Memory ------------------------------------------------------------------

    def _dm_vms(self) -> dict[str, tuple[MemorySettings, DynamicMemoryWorker]]:
        with self._lock:
            out = {}
            for name, vm in self._vms.items():
                port = self._port(vm)
                if vm.migration is not None or name in self._resizing:
                    continue  # the balancer holds its operations while it migrates or resizes
                if vm.state == RUNNING and vm.settings.dynamic_memory and port is not None:
                    out[name] = (vm.settings.memory_settings(), port)
            return out

    def _dm(self, name: str) -> DynamicMemoryWorker:
        vm = self._get(name)
        if vm.worker is None:
            raise Conflict(f"VM {name!r} is {vm.state}: start it first")
        if not vm.settings.dynamic_memory:
            raise Conflict(
                f"Dynamic Memory is not enabled for VM {name!r}: stop it and set "
                "dynamic_memory (`pyhv vm memory NAME --dynamic`)"
            )
        port = self._port(vm)
        if port is None:
            raise Conflict(
                "Dynamic Memory is not running in this VM: its worker does not offer the "
                "Dynamic Memory channel"
            )
        return port

    def _port(self, vm: _Vm) -> DynamicMemoryWorker | None:
        """The worker's DM port; with a memory cgroup, one that raises the cgroup's limit before
        a target above the VM's assignment goes out."""
        port = dm_port(vm.worker)
        if port is None or vm.memory is None or vm.memory.cgroup is None:
            return port
        return _LimitFirst(port, vm.memory, lambda: self.pool.assigned_pages(vm.settings.name))

    def _subscribe(self, name: str, worker: object) -> None:
        """Take the memory statuses `worker` pushes (a worker without Dynamic Memory has none)."""
        subscribe = getattr(worker, "subscribe_memory_status", None)
        if subscribe is None:
            return
        subscribe(
            lambda status: self._status_pushed(name, worker, status),
            lambda why: self._status_refused(name, why),
            lambda why: self.worker_counters.refused_by_worker(name),
        )

    def _status_pushed(self, name: str, worker: object, status: MemoryStatus) -> None:
        """A VM's worker pushed its memory status (on the worker's reader thread). Not under
        the service's lock: a request may hold it while it waits for this worker's answer."""
        vm = self._vms.get(name)
        if vm is not None and vm.worker is worker:
            why = self.smart_paging.refuse_status(name, status, worker, vm.memory)
            if why is not None:
                self._status_refused(name, why)
                return
        if vm is None or vm.worker is not worker or not self.pool.record(name, status):
            return  # from a worker this VM no longer has, or a VM that ended meanwhile
        if vm.memory is not None:
            vm.memory.after_status(status.assigned_pages, status.busy)
        self.worker_counters.record(name, status)
        for listener in self.status_listeners:
            listener(name, status)
        self.balancer.status_arrived()

    def _status_refused(self, name: str, why: str) -> None:
        """A VM's worker sent a message that does not decode (pyhv.worker.messages): counted,
        and the VM's last good status stands."""
        log.warning("VM %s: a message of its worker was refused: %s", name, why)
        self.worker_counters.refused(name)

    def memory_status(self, name: str) -> dict[str, Any]:
        """The VM's memory, in bytes, as its worker last pushed it (committed and available
        None until the guest reported). No request goes to the worker."""
        with self._lock:
            self._dm(name)
            if not self.pool.holds(name):
                raise Conflict(f"VM {name!r} holds no memory of the pool: it is ending")
            visible, assigned, ballooned = self.pool.pages(name)
            st = self.pool.latest(name)

        def _bytes(pages: int | None) -> int | None:
            return None if pages is None else pages * PAGE_SIZE

        return {
            "visible": visible * PAGE_SIZE,
            "assigned": assigned * PAGE_SIZE,
            "ballooned": ballooned * PAGE_SIZE,
            "committed": _bytes(None if st is None else st.committed_pages),
            "available": _bytes(None if st is None else st.available_pages),
            "busy": False if st is None else st.busy,
            "page_file": _bytes(None if st is None else st.page_file_pages),
            "page_file_writes": None if st is None else st.page_file_writes,
        }

    def set_memory_target(self, name: str, target: object) -> dict[str, Any]:
        size = _size_field("target", target)
        with self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "change its memory target")
            port = self._dm(name)
            s = vm.settings
            if not s.minimum <= size <= s.maximum:
                raise VmmsError(
                    f"target {format_size(size)} is outside the Dynamic Memory range of VM "
                    f"{name!r}, {format_size(s.minimum)}..{format_size(s.maximum)}: pick a target "
                    "inside it or change minimum/maximum"
                )
        try:
            self.balancer.request_target(name, port, size // PAGE_SIZE)
        except DynamicMemoryUnavailable as e:
            raise Conflict(str(e)) from None
        return {"name": name, "target": size}

    def _refuse_while_resizing(self, name: str) -> None:
        if name in self._resizing:
            raise Conflict(f"VM {name!r} is being resized: try again when that ends")

    def resize_memory(self, name: str, memory: object) -> dict[str, Any]:
        """Set-VMMemory -StartupBytes on a running VM (pyhv.vmms.resize): hot-add or hot-remove
        to `memory`, then store what is now visible as the startup memory (the VM's memory,
        also at its next boot). The answer says what the guest gave (`complete`)."""
        size = _size_field("memory", memory)
        with self._lock:
            vm = self._get(name)
            self._refuse_while_migrating(vm, "resize it")
            self._refuse_while_resizing(name)
            if vm.state != RUNNING:
                raise Conflict(
                    f"VM {name!r} is {vm.state}: a resize is for a running VM; set the startup "
                    f'memory of a VM that is off with PATCH /api/vms/{name} {{"memory": ...}}'
                )
            port = self._dm(name)
            try:
                check_size(name, size, vm.settings, self.pool)
            except ResizeError as e:
                raise VmmsError(str(e)) from None
            except KeyError:
                raise Conflict(f"VM {name!r} holds no memory of the pool: it is ending") from None
            worker = vm.worker
            self._resizing.add(name)
        try:
            result = resize(name, port, worker, self.pool, size)
        except ResizeUnavailable as e:
            raise Conflict(str(e)) from None
        finally:
            with self._lock:
                self._resizing.discard(name)
        with self._lock:
            vm = self._get(name)
            visible = result["visible"]
            if visible != vm.settings.memory:
                try:
                    new = apply_changes(vm.settings, {"memory": visible}, running=False)
                except VmSettingsError as e:
                    raise VmmsError(f"VM {name!r} now has {format_size(visible)}: {e}") from None
                self._save(new)
                vm.settings = new
        log.info(
            "VM %s resized: asked %s, visible %s -> %s", name, format_size(size),
            format_size(result["before"]), format_size(visible),
        )  # fmt: skip
        return {**result, "startup": vm.settings.memory}

    def host(self) -> dict[str, int]:
        """The host's pool for VMs, in bytes: budget, reserve, free (reserve excluded)."""
        p = self.pool
        with self._lock:
            running = sum(vm.worker is not None for vm in self._vms.values())
        return {
            "budget": p.budget_pages * PAGE_SIZE,
            "reserve": p.reserve_pages * PAGE_SIZE,
            "free": p.free_pages * PAGE_SIZE,
            "running_vms": running,
        }

    # --- counters ------------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        return self.registry.snapshot()

    def metrics(self) -> str:
        return prometheus_text(self.registry)
