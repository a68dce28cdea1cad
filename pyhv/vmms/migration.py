"""Live migration between two VMMS instances (`pyhv vm migrate NAME --to HOST:PORT`).

The source VMMS asks the destination VMMS (its API over TCP, over TLS with this VMMS's
certificate when it has one, with the destination's migration token, which can do nothing but
this) to prepare: the destination checks the configuration, takes the VM's memory from its pool,
creates the VM's entry (state "incoming") and an incoming worker listening on a migration port
with a one-time migration token, and answers {id, host, port, token}. The source then drives its
worker with `pyhv.migration.worker.migrate_worker`; on success the VM runs at the destination and
the source forgets it (its worker stopped, its memory back in the pool). A failure at any phase
leaves the source VM running and the destination holding nothing (entry deleted, worker gone,
pool restored).

The classic gap - the connection drops after COMMIT went out and before RESUMED came back - is
closed by asking: the source worker stays paused (`resume_in_doubt=False`), the source VMMS asks
the destination VMMS for the incoming migration's state, and stops its VM if it runs there or
resumes it if it does not. If it cannot find out, the VM stays paused here ("paused", with the
reason): never running on both hosts.

While a VM migrates, the balancer leaves it alone and requests that conflict (stop, delete,
settings, memory target, another migration) get 409.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from pyhv.migration.source import MigrationInDoubt, MigrationOptions
from pyhv.migration.stream import MigrationError
from pyhv.vmms.client import ClientError, ClientTls, VmmsClient
from pyhv.vmms.config import VmSettingsError, settings_from_dict

if TYPE_CHECKING:
    from pyhv.vmms.inventory import VmEntry
    from pyhv.vmms.service import Vmms

log = logging.getLogger(__name__)

#: States of a migration record.
PREPARING, MIGRATING, WAITING, DONE, RUNNING, FAILED, IN_DOUBT = (
    "preparing",  # source: asking the destination VMMS
    "migrating",  # source: the workers are copying
    "waiting",  # destination: the incoming worker listens / receives
    "done",  # source: the VM runs at the destination, gone here
    "running",  # destination: the VM arrived and runs here
    "failed",  # either: nothing moved; the source VM runs on
    "in-doubt",  # source: could not learn whether the destination runs it; paused here
)
FINAL = (DONE, RUNNING, FAILED, IN_DOUBT)

_ids = itertools.count(1)


class IncomingWorkerLike(Protocol):
    """What the service needs of a destination worker (pyhv.migration.worker.IncomingWorker)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def returncode(self) -> int | None: ...
    @property
    def end(self) -> Any: ...

    def start(self) -> None: ...
    def send(self, data: bytes) -> None: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float | None = None) -> Any: ...
    def close(self, timeout: float = ...) -> None: ...
    def wait_listening(self, timeout: float = ...) -> tuple[str, int]: ...
    def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None: ...


IncomingFactory = Callable[..., IncomingWorkerLike]


class Migrator(Protocol):
    """Drives a source worker (default: pyhv.migration.worker's migrate_worker)."""

    def migrate(
        self,
        worker: Any,
        address: tuple[str, int],
        token: str,
        options: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], object],
        counters: Any,
    ) -> dict[str, Any]: ...

    def decide(self, worker: Any, migration_id: int, resume: bool) -> None: ...


class WorkerMigrator:
    def migrate(
        self,
        worker: Any,
        address: tuple[str, int],
        token: str,
        options: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], object],
        counters: Any,
    ) -> dict[str, Any]:
        from pyhv.migration.worker import migrate_worker

        return migrate_worker(worker, address, token, options, on_progress, counters=counters)

    def decide(self, worker: Any, migration_id: int, resume: bool) -> None:
        from pyhv.migration.worker import decide_in_doubt

        decide_in_doubt(worker, migration_id, resume)


def _incoming_worker(token: str, listen: tuple[str, int], output: Any, **kw: Any) -> Any:
    from pyhv.migration.worker import IncomingWorker

    return IncomingWorker(token, listen, output, **kw)


@dataclass
class Migration:
    """One migration as either VMMS sees it (GET /api/migrations/{id})."""

    id: str
    direction: str  # "outgoing" | "incoming"
    vm: str
    peer: str  # the destination VMMS (outgoing) or the source's address once known (incoming)
    state: str
    error: str = ""
    progress: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    remote_id: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "direction": self.direction,
            "vm": self.vm,
            "peer": self.peer,
            "state": self.state,
            "error": self.error,
            "progress": self.progress,
            "result": self.result,
            "remote_id": self.remote_id,
            "started": self.started,
            "ended": self.ended,
        }


def exit_point_for_tests(point: str) -> None:
    """Test-only: a VMMS started with PYHV_TEST_VMMS_EXIT=POINT dies here at once, as a kill -9
    would (``prepare``: the incoming worker listens, the source not yet answered;
    ``committed``: the arriving VM recorded (its worker asks before the source pauses), its
    worker not yet told it may resume; ``resumed``: just after). Never set outside the test
    suite."""
    import os

    if os.environ.get("PYHV_TEST_VMMS_EXIT") == point:
        log.warning("PYHV_TEST_VMMS_EXIT=%s: exiting now", point)
        os._exit(9)


def check_destination(text: object) -> str:
    """'HOST:PORT' of the destination VMMS's TCP API."""
    from pyhv.vmms.inventory import VmmsError

    if not isinstance(text, str):
        raise VmmsError(f"destination must be 'HOST:PORT' text, got {text!r}")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise VmmsError(
            f"destination {text!r} is not HOST:PORT: give the destination VMMS's TCP address "
            "(`pyhv vmms serve --tcp 127.0.0.1:PORT` there)"
        )
    return text


class Migrations:
    """The migration half of the VMMS (both directions); `vmms` is the service it serves,
    through its public calls for migration (entry, add_incoming, console_sink, adopt, remove,
    begin_migration, end_migration). The migration records have a lock of their own."""

    def __init__(
        self,
        vmms: Vmms,
        *,
        listen_host: str = "127.0.0.1",
        incoming_factory: IncomingFactory = _incoming_worker,
        migrator: Migrator | None = None,
        accept_timeout: float = 60.0,
        in_doubt_timeout: float = 60.0,
        client_timeout: float = 30.0,
        keep_finished: int = 100,
        peer_tls: ClientTls | None = None,
        test_hooks: bool | None = None,
    ) -> None:
        self.vmms = vmms
        self.listen_host = listen_host
        self.incoming_factory = incoming_factory
        self.migrator: Migrator = migrator or WorkerMigrator()
        self.accept_timeout = accept_timeout
        self.in_doubt_timeout = in_doubt_timeout
        self.client_timeout = client_timeout
        self._records: dict[str, Migration] = {}
        #: Finished records kept (the newest); older ones go as new migrations begin. A
        #: migration in doubt is kept until it is resolved.
        self.keep_finished = keep_finished
        #: Source records in doubt: id -> (vm, worker, the worker's migration id).
        self._doubts: dict[str, tuple[VmEntry, Any, int]] = {}
        #: Incoming ids this VMMS refused to record (disk full): the reason a later drop gives,
        #: whichever comes first, the worker's end or the source's cancel.
        self._refusals: dict[str, str] = {}
        #: Guards the records (taken before the service's own lock, never after).
        self._lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        #: TLS to destination VMMSes (None: plain HTTP, loopback only).
        self.peer_tls = peer_tls
        #: Test-only hooks (options.faults, pyhv.migration.faults) are taken only with this on:
        #: PYHV_TEST_HOOKS=1 in the VMMS's environment (tests/vmms/vmms_process.py sets it).
        self.test_hooks = (
            os.environ.get("PYHV_TEST_HOOKS") == "1" if test_hooks is None else test_hooks
        )

    # --- either side ---------------------------------------------------------------------

    def get(self, mid: str) -> dict[str, Any]:
        from pyhv.vmms.inventory import NotFound

        with self._lock:
            rec = self._records.get(mid)
            if rec is None:
                raise NotFound(f"no migration {mid!r} on this host")
            return rec.to_dict()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r.to_dict() for r in self._records.values()]

    def _new(self, direction: str, vm: str, peer: str, state: str) -> Migration:
        mid = f"{direction[:2]}-{next(_ids)}-{secrets.token_hex(4)}"
        rec = Migration(mid, direction, vm, peer, state)
        self._records[mid] = rec
        self._forget_old()
        return rec

    def _forget_old(self) -> None:
        finished = [
            mid
            for mid, r in self._records.items()
            if r.state in FINAL and r.state != IN_DOUBT and mid not in self._doubts
        ]
        for mid in finished[: max(0, len(finished) - self.keep_finished)]:
            del self._records[mid]

    def _end(self, rec: Migration, state: str, error: str = "") -> None:
        rec.state, rec.error, rec.ended = state, error, time.time()

    def _hold_in_doubt(self, vm: VmEntry, worker: Any, wid: int, rec: Migration, why: str) -> None:
        """(Under the lock.) The VM stays PAUSED until an operator settles the migration."""
        from pyhv.vmms.inventory import PAUSED

        self.vmms.end_migration(vm, worker=worker, state=PAUSED, reason=why)
        self._end(rec, IN_DOUBT, why)
        self._doubts[rec.id] = (vm, worker, wid)

    def _spawn(self, target: Callable[..., None], *args: Any, name: str) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    # --- destination side ----------------------------------------------------------------

    def prepare_incoming(self, body: Mapping[str, object]) -> dict[str, Any]:
        """Create the VM's entry and an incoming worker; {id, vm, host, port, token}."""
        from pyhv.vmms.inventory import Conflict, VmmsError

        extra = sorted(set(body) - {"settings", "memory", "source"})
        if extra:
            raise VmmsError(f"unknown field(s) {extra}: send settings, memory and source")
        raw = body.get("settings")
        if not isinstance(raw, dict):
            raise VmmsError("settings must be the VM's settings object (GET /api/vms/{name})")
        try:
            settings = settings_from_dict(raw)
        except VmSettingsError as e:
            raise VmmsError(f"the VM's configuration is refused here: {e}") from None
        needed = body.get("memory", settings.memory)
        if isinstance(needed, bool) or not isinstance(needed, int) or needed < settings.memory:
            raise VmmsError(
                f"memory must be the VM's RAM in bytes (at least its startup memory "
                f"{settings.memory}), got {needed!r}"
            )
        source = str(body.get("source") or "")
        name = settings.name
        vmms = self.vmms
        try:  # the image by its name in this host's images directory, never the source's path
            image = vmms.images.resolve(settings.image)
        except Exception as e:  # noqa: BLE001 - ImageError, or the bundled guest cannot build
            raise Conflict(f"the destination cannot take VM {name!r}: {e}") from None
        with self._lock:
            rec = self._new("incoming", name, source, WAITING)
            try:
                vm = vmms.add_incoming(settings, needed, rec.id)
            except Conflict:
                del self._records[rec.id]
                raise
        token = secrets.token_urlsafe(24)
        try:
            worker = self.incoming_factory(
                token,
                (self.listen_host, 0),
                vmms.console_sink(vm),
                max_memory=needed,
                accept_timeout=self.accept_timeout,
                image=image,
                page_file=vmms.page_file(name) if settings.page_file_size else None,
                confirm=True,
            )
            vm.worker = worker
            vmms._subscribe(name, worker)
            vmms.jail_incoming(vm, worker, needed)
            vmms.adoptable_incoming(vm, worker, rec.id)
            worker.start()
            host, port = worker.wait_listening(15.0)
        except Exception as e:  # noqa: BLE001 - the entry goes, the source is told why
            self._drop_incoming(vm, rec, f"the incoming worker did not start: {e}")
            raise Conflict(f"the destination cannot take VM {name!r}: {e}") from None
        log.info("VM %s: incoming migration %s listens on %s:%s", name, rec.id, host, port)
        exit_point_for_tests("prepare")
        self._spawn(self._watch_incoming, vm, rec, worker, name=f"incoming-{name}")
        return {"id": rec.id, "vm": name, "host": host, "port": port, "token": token}

    def _watch_incoming(self, vm: VmEntry, rec: Migration, worker: IncomingWorkerLike) -> None:
        info: dict[str, Any] | None = None
        deadline = time.monotonic() + self.accept_timeout + 3600.0
        while time.monotonic() < deadline:
            info = worker.wait_migrated(0.25)
            if info is not None or worker.end is not None:
                break
        if info is None:
            end = worker.wait(5.0)
            why = end.describe() if end is not None else "no VM arrived in time"
            self._drop_incoming(vm, rec, why)
            return
        with self._lock:
            rec.peer = str(info.get("source") or rec.peer)
            rec.result = {k: info.get(k) for k in ("source", "passes", "pages")}
            # From now on an ordinary worker of this VMMS; a failed save is the record's error.
            self._end(rec, RUNNING, self.vmms.adopt(vm, worker))
        exit_point_for_tests("resumed")
        self.vmms.runs.update(vm.settings.name, incoming="")  # it ran here
        log.info(
            "VM %s arrived from %s and runs here (worker pid %s)",
            vm.settings.name,
            rec.peer,
            worker.pid,
        )

    def refuse_arrival(self, mid: str, why: str) -> None:
        """This VMMS could not record incoming migration `mid`'s VM (it will not resume):
        the reason its record gives when it is dropped."""
        with self._lock:
            self._refusals[mid] = why

    def _drop_incoming(self, vm: VmEntry, rec: Migration, why: str) -> None:
        """The VM did not arrive: the entry, the worker and the memory all go."""
        with self._lock:
            why = self._refusals.pop(rec.id, why)
        worker = vm.worker
        if worker is not None:
            try:
                worker.close(0.5)
            except Exception:  # noqa: BLE001 - it may not have started at all
                log.exception("closing the incoming worker failed")
        with self._lock:
            # (once: a second call finds it gone) Its settings go too: they were stored when its
            # worker asked to resume it (before the source's pause), and the VM never ran here.
            self.vmms.remove(vm, forget_settings=True)
            vm.worker = None
            if rec.state not in FINAL:
                self._end(rec, FAILED, why)
        log.info("incoming migration %s of %s failed: %s", rec.id, vm.settings.name, why)

    # --- after a VMMS restart (pyhv.vmms.adoption) ---------------------------------------

    def arrived_before_restart(self, mid: str, name: str) -> None:
        """An adopted worker arrived by incoming migration `mid` under the previous VMMS: the
        source may still ask about it (in doubt), so the record says it runs here."""
        with self._lock:
            rec = Migration(mid, "incoming", name, "", RUNNING)
            rec.ended = time.time()
            rec.error = "arrived under the previous VMMS, which went away; adopted here"
            self._records[mid] = rec
            self._forget_old()

    def outgoing_before_restart(
        self, vm: VmEntry, worker: Any, wid: int | None, state: str
    ) -> None:
        """An adopted worker was migrating its VM away when the previous VMMS went: the VM
        stays "migrating" here until the worker says how it ended (migrated: forgotten here;
        failed: it runs on). One whose migration waits in doubt stays paused until settled."""
        from pyhv.worker import messages as m

        name = vm.settings.name
        with self._lock:
            rec = self._new("outgoing", name, "(unknown: begun by the previous VMMS)", MIGRATING)
            rec.error = "begun by the previous VMMS, which went away; its worker carried on"
            self.vmms.mark_migrating(vm, rec.id)
            if state == "paused" and wid is not None:
                why = (
                    "its migration was in doubt when the previous VMMS went away: check the "
                    "destination, then settle it: POST "
                    f'/api/migrations/{rec.id}/resolve with {{"resume": false}} if it runs '
                    "there, true if it does not"
                )
                self._hold_in_doubt(vm, worker, wid, rec, why)
                return

        def on_event(msg: Any) -> None:
            if isinstance(msg, m.MigrationDone) and msg.id == wid:
                rec.result = msg.result
                self._spawn(self._gone, vm, rec, worker, name=f"migrated-{name}")
            elif isinstance(msg, m.MigrationFailed) and msg.id == wid:
                if msg.in_doubt:  # no destination VMMS known here to ask: the operator
                    with self._lock:
                        why = f"{msg.error}: in doubt; settle it (POST .../resolve)"
                        self._hold_in_doubt(vm, worker, wid, rec, why)
                else:
                    self._fail(vm, rec, msg.error)

        worker.listeners.append(on_event)

    def resolve(self, mid: str, body: Mapping[str, object]) -> dict[str, Any]:
        """The administrator settles a migration in doubt: resume the VM here (it does not run
        at the destination) or stop and forget it here (it does)."""
        from pyhv.vmms.inventory import RUNNING, Conflict, NotFound, VmmsError

        resume = body.get("resume")
        if set(body) != {"resume"} or not isinstance(resume, bool):
            raise VmmsError('send {"resume": true} (resume it here) or {"resume": false} only')
        with self._lock:
            rec = self._records.get(mid)
            if rec is None:
                raise NotFound(f"no migration {mid!r} on this host")
            doubt = self._doubts.pop(mid, None)
            if doubt is None or rec.state != IN_DOUBT:
                raise Conflict(f"migration {mid} is {rec.state}, not in doubt: nothing to settle")
            vm, worker, wid = doubt
            if vm.worker is not worker:
                self._end(rec, FAILED, rec.error + "; the VM ended here meanwhile")
                return rec.to_dict()
        self.migrator.decide(worker, wid, resume)
        if resume:
            with self._lock:
                self.vmms.end_migration(vm, state=RUNNING)
                self._end(rec, FAILED, rec.error + "; settled: resumed here")
        else:
            self._gone(vm, rec, worker, "settled: it runs at the destination; stopped here")
        with self._lock:
            return rec.to_dict()

    def cancel(self, mid: str) -> dict[str, Any]:
        """The source gave up before its worker connected (or midway): drop what we hold."""
        from pyhv.vmms.inventory import Conflict, NotFound

        with self._lock:
            rec = self._records.get(mid)
            if rec is None or rec.direction != "incoming":
                raise NotFound(f"no incoming migration {mid!r} on this host")
            if rec.state == RUNNING:
                raise Conflict(f"VM {rec.vm!r} arrived and runs here: `pyhv vm stop` it instead")
            vm = self.vmms.entry(rec.vm)
        if rec.state == WAITING and vm is not None and vm.migration == mid:
            self._drop_incoming(vm, rec, "cancelled by the source")
        return rec.to_dict()

    # --- source side ---------------------------------------------------------------------

    def start(self, name: str, body: Mapping[str, object]) -> dict[str, Any]:
        """Begin migrating running VM `name` to the destination VMMS; the record (poll it)."""
        from pyhv.vmms.inventory import VmmsError

        extra = sorted(set(body) - {"destination", "token", "options"})
        if extra:
            raise VmmsError(f"unknown field(s) {extra}: send destination, token and options")
        destination = check_destination(body.get("destination"))
        token = body.get("token")
        if not isinstance(token, str) or not token:
            raise VmmsError(
                "token must be the destination VMMS's migration token (its 'migration-token' file)"
            )
        raw_options = body.get("options") or {}
        if not isinstance(raw_options, dict):
            raise VmmsError("options must be an object of migration options")
        if raw_options.get("faults") and not self.test_hooks:
            raise VmmsError(
                "options.faults is a test hook (it breaks migrations on purpose, or ends the "
                "worker): this VMMS takes it only when started with PYHV_TEST_HOOKS=1"
            )
        try:
            options = MigrationOptions.from_dict(dict(raw_options)).as_dict()
        except (MigrationError, TypeError) as e:
            raise VmmsError(f"bad migration options: {e}") from None
        options["resume_in_doubt"] = False  # we ask the destination instead
        try:
            client = VmmsClient(
                tcp=destination, token=token, timeout=self.client_timeout, tls=self.peer_tls
            )
        except ClientError as e:
            raise VmmsError(f"cannot reach the destination VMMS: {e}") from None
        with self._lock:
            rec = self._new("outgoing", name, destination, PREPARING)
            try:
                vm, worker, needed = self.vmms.begin_migration(name, rec.id)
            except VmmsError:
                del self._records[rec.id]
                raise
            settings = vm.settings.to_dict()
        self._spawn(
            self._outgoing,
            vm,
            rec,
            worker,
            client,
            {"settings": settings, "memory": needed, "source": f"pid {worker.pid}"},
            options,
            name=f"migrate-{name}",
        )
        with self._lock:
            return rec.to_dict()

    def _outgoing(
        self,
        vm: VmEntry,
        rec: Migration,
        worker: Any,
        client: VmmsClient,
        request: dict[str, Any],
        options: dict[str, Any],
    ) -> None:
        name = vm.settings.name
        try:
            ans = client.request("POST", "/api/migrations/incoming", request)
            addr = (str(ans["host"]), int(ans["port"]))
            rec.remote_id, mtoken = str(ans["id"]), str(ans["token"])
        except ClientError as e:
            why = (
                "the destination VMMS refused the token (401): give that VMMS's migration token "
                "(its state directory's 'migration-token')"
                if e.status == 401
                else f"the destination VMMS refused: {e}"
                if e.status
                else f"cannot reach the destination VMMS: {e}"
            )
            self._fail(vm, rec, why)
            return
        except (KeyError, TypeError, ValueError) as e:
            self._fail(vm, rec, f"the destination VMMS gave an unusable answer: {e}")
            return
        rec.state = MIGRATING

        def progress(p: dict[str, Any]) -> None:
            rec.progress = p

        try:
            result = self.migrator.migrate(
                worker, addr, mtoken, options, progress, self.vmms.registry
            )
        except MigrationInDoubt as e:
            self._resolve(vm, rec, worker, client, e)
            return
        except MigrationError as e:
            self._cancel_remote(client, rec)
            self._fail(vm, rec, str(e))
            return
        except Exception as e:  # noqa: BLE001 - the VM must not be left marked migrating
            log.exception("migration of %s failed", name)
            self._cancel_remote(client, rec)
            self._fail(vm, rec, f"{type(e).__name__}: {e}")
            return
        rec.result = result
        self._gone(vm, rec, worker)

    def _cancel_remote(self, client: VmmsClient, rec: Migration) -> None:
        try:
            client.request("DELETE", f"/api/migrations/{rec.remote_id}")
        except ClientError as e:
            log.info("destination's incoming migration %s not cancelled: %s", rec.remote_id, e)

    def _fail(self, vm: VmEntry, rec: Migration, why: str) -> None:
        with self._lock:
            self.vmms.end_migration(vm)
            self._end(rec, FAILED, why)
        log.warning("migration of %s failed: %s", vm.settings.name, why)

    def _gone(self, vm: VmEntry, rec: Migration, worker: Any, note: str = "") -> None:
        """The VM runs at the destination: its worker here ends, the entry goes."""
        vmms = self.vmms
        worker.wait(30.0)
        for _ in range(600):  # the watcher records the end and returns the memory
            if vm.worker is not worker:
                break
            time.sleep(0.02)
        name = vm.settings.name
        with self._lock:
            vmms.remove(vm, forget_settings=True)  # (the watcher gave its memory back)
            vmms.end_migration(vm)
            self._end(rec, DONE, note)
        log.info("VM %s migrated to %s", name, rec.peer)

    def _ask(self, client: VmmsClient, rec: Migration) -> str | None:
        """The destination's state of the incoming migration, once it is final; None if the
        destination VMMS cannot tell within in_doubt_timeout."""
        deadline = time.monotonic() + self.in_doubt_timeout
        while time.monotonic() < deadline:
            try:
                state = client.request("GET", f"/api/migrations/{rec.remote_id}")["state"]
            except (ClientError, KeyError, TypeError) as e:
                log.info("asking the destination about %s: %s", rec.remote_id, e)
                if isinstance(e, ClientError) and e.status == 404:
                    return FAILED  # it holds nothing of it
            else:
                if state in (RUNNING, FAILED):
                    return str(state)
            time.sleep(0.2)
        return None

    def _resolve(
        self, vm: VmEntry, rec: Migration, worker: Any, client: VmmsClient, e: MigrationInDoubt
    ) -> None:
        mid = getattr(e, "migration_id", 0)
        log.warning("migration of %s in doubt (%s): asking the destination", vm.settings.name, e)
        there = self._ask(client, rec)
        if there == RUNNING:
            self.migrator.decide(worker, mid, resume=False)
            self._gone(
                vm,
                rec,
                worker,
                "the connection was lost after COMMIT; the destination VMMS confirmed the VM "
                "runs there, so it was stopped here",
            )
        elif there == FAILED:
            self.migrator.decide(worker, mid, resume=True)
            self._fail(
                vm,
                rec,
                f"{e}; the destination VMMS says it does not run the VM: resumed here",
            )
        else:
            why = (
                f"{e}; the destination VMMS could not say within {self.in_doubt_timeout:g} s "
                "whether it runs the VM, so it stays PAUSED here (never on both hosts): check "
                f"the destination (`pyhv vm list --tcp {rec.peer}`), then settle it: POST "
                f'/api/migrations/{rec.id}/resolve with {{"resume": false}} if it runs there '
                "(it is stopped and forgotten here), true if it does not"
            )
            with self._lock:
                self._hold_in_doubt(vm, worker, mid, rec, why)
            log.error("VM %s: %s", vm.settings.name, why)
