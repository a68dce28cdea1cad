"""Live migration between worker processes (one OS process per VM, pyhv.worker).

In the worker (server side):

- ``{"op": "migrate", "id": n, "host": h, "port": p, "token": t, "options": {...}}`` starts an
  outgoing migration on a thread; progress comes back as ``{"ev": "migration", "id": n,
  "progress": {...}}``, the end as ``{"ev": "migration", "id": n, "result": {...}}`` (then the
  VM stops: "migrated to h:p") or ``{"ev": "migration", "id": n, "error": text, "phase": p}``
  (the VM runs on). With the option ``resume_in_doubt`` false, a connection lost after
  COMMIT is reported as ``{"ev": "migration", "id": n, "error": text, "phase": "commit",
  "in_doubt": true}`` with the VM paused; the owner then sends ``{"op": "migrate", "id": n,
  "decision": "stop" | "resume"}`` (stop: the VM runs at the destination; resume: it does not).
- A worker whose first message is ``{"op": "incoming", "listen": [host, port], "token": t,
  "max_memory": bytes | null, "timeout": s, "accept_timeout": s}`` is a destination: it
  answers ``{"ev": "listening", "host": h, "port": p}``, takes one migration, and from then on
  is an ordinary worker of the migrated VM (``{"ev": "migrated_in", "config": {...}, ...}``
  then ``{"ev": "started"}``); if the migration fails it reports ``ended`` and exits.

On the owner's side, :class:`IncomingWorker` starts a destination worker and
:func:`migrate_worker` drives a source worker.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyhv.migration.counters import publish, register
from pyhv.migration.destination import Incoming, listen
from pyhv.migration.source import MigrationInDoubt, MigrationOptions, Source
from pyhv.migration.stream import MigrationError
from pyhv.worker.outcome import WORKER_ERROR, VmEnd
from pyhv.worker.process import WorkerProcess

if TYPE_CHECKING:
    from pyhv.counters.registry import CounterRegistry
    from pyhv.worker.config import VmConfig
    from pyhv.worker.vm import VirtualMachine

Send = Callable[[dict[str, object]], None]

# --- inside the worker process ------------------------------------------------------------


class WorkerIncoming:
    """The destination's hooks as the worker's serve() uses them."""

    def __init__(self, incoming: Incoming, config: dict[str, Any]) -> None:
        self.incoming = incoming
        self.config = config
        self.vm: VirtualMachine | None = None

    def receive(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.incoming.receive(vm)

    def resumed(self, send: Send) -> None:
        self.incoming.resumed(self.vm.running_since if self.vm is not None else None)
        inc = self.incoming
        send(
            {
                "ev": "migrated_in",
                "config": self.config,
                "source": inc.peer,
                "passes": inc.passes,
                "pages": inc.pages,
            }
        )


def _ended(send: Send, detail: str) -> None:
    send({"ev": "ended", "end": VmEnd(WORKER_ERROR, detail=detail).to_dict()})


def accept_incoming(
    first: dict[str, object], send: Send
) -> tuple[WorkerIncoming | None, dict[str, object]]:
    """Listen, report the port, take one source up to its configuration. Returns the hooks and
    the boot message to go on with, or (None, {}) after reporting the failure."""
    from pyhv.worker.config import ConfigError, VmConfig

    try:
        where = first.get("listen") or ["127.0.0.1", 0]
        host, port = str(where[0]), int(where[1])  # type: ignore[index, call-overload]
        token = first.get("token")
        if not isinstance(token, str):
            raise MigrationError("an incoming migration needs a token (text)")
        lst = listen(host, port)
    except (MigrationError, OSError, TypeError, ValueError, IndexError) as e:
        _ended(send, f"incoming migration: cannot listen: {e}")
        return None, {}
    bound = lst.getsockname()
    send({"ev": "listening", "host": bound[0], "port": bound[1]})
    max_memory = first.get("max_memory")
    try:
        inc = Incoming(
            lst,
            token,
            max_memory=max_memory if isinstance(max_memory, int) else None,
            timeout=float(first.get("timeout") or 30.0),  # type: ignore[arg-type]
            accept_timeout=float(first.get("accept_timeout") or 300.0),  # type: ignore[arg-type]
            faults=first.get("faults") or None,  # type: ignore[arg-type]
        )
    except (MigrationError, ValueError) as e:
        lst.close()
        _ended(send, f"incoming migration: {e}")
        return None, {}
    try:
        config = inc.accept()
        try:
            VmConfig.from_dict(config)
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            err = MigrationError(f"this host cannot run the VM's configuration: {e}", "config")
            inc.fail(err)
            raise err from None
    except Exception as e:  # noqa: BLE001 - reported to the owner, who decides
        _ended(send, f"incoming migration failed: {e}")
        return None, {}
    return WorkerIncoming(inc, config), {"op": "boot", "config": config}


_busy = threading.Lock()
#: Migrations in doubt, waiting for the owner's decision: id -> (event, [decision]).
_decisions: dict[object, tuple[threading.Event, list[str]]] = {}


def _await_decision(vm: VirtualMachine, mid: object) -> str:
    event, box = _decisions[mid]
    try:
        while not event.wait(1.0):
            if vm.end is not None:  # stopped meanwhile (the owner went away)
                return "stop"
        return box[0]
    finally:
        _decisions.pop(mid, None)


def start_migration(vm: VirtualMachine, msg: dict[str, object], send: Send) -> None:
    """Run one outgoing migration on a thread of its own, reporting to the owner (or take the
    owner's decision on a migration in doubt)."""
    mid = msg.get("id")
    if "decision" in msg:
        waiter = _decisions.get(mid)
        if waiter is not None:
            waiter[1].append(str(msg["decision"]))
            waiter[0].set()
        return

    def run() -> None:
        if not _busy.acquire(blocking=False):
            send({"ev": "migration", "id": mid, "error": "a migration is already running"})
            return
        try:
            opts = MigrationOptions.from_dict(dict(msg.get("options") or {}))  # type: ignore[call-overload]
            addr = (str(msg["host"]), int(msg["port"]))  # type: ignore[call-overload]
            src = Source(
                vm,
                addr,
                str(msg["token"]),
                opts,
                on_progress=lambda p: send({"ev": "migration", "id": mid, "progress": p}),
            )
            _decisions[mid] = (threading.Event(), [])
            result = src.run()
        except MigrationInDoubt as e:
            send(
                {"ev": "migration", "id": mid, "error": str(e), "phase": e.phase, "in_doubt": True}
            )
            if _await_decision(vm, mid) == "resume":
                src.resume_here()
            else:
                src.clean_up()
        except MigrationError as e:
            send({"ev": "migration", "id": mid, "error": str(e), "phase": e.phase})
        except (KeyError, TypeError, ValueError) as e:
            send({"ev": "migration", "id": mid, "error": f"bad migrate request: {e}"})
        else:
            send({"ev": "migration", "id": mid, "result": result})
            src.clean_up()
        finally:
            _decisions.pop(mid, None)
            _busy.release()

    threading.Thread(target=run, name="migration-source", daemon=True).start()


# --- the owner's side ---------------------------------------------------------------------


class IncomingWorker(WorkerProcess):
    """A destination worker process: listens, takes one VM, then runs it like any worker."""

    def __init__(
        self,
        token: str,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        output: Callable[[bytes], None] | None = None,
        *,
        max_memory: int | None = None,
        timeout: float = 30.0,
        accept_timeout: float = 300.0,
        faults: dict[str, str] | None = None,
        config: VmConfig | None = None,
    ) -> None:
        super().__init__(config, output)  # type: ignore[arg-type]  # known once migrated in
        self._request: dict[str, object] = {
            "op": "incoming",
            "listen": list(listen),
            "token": token,
            "max_memory": max_memory,
            "timeout": timeout,
            "accept_timeout": accept_timeout,
            "faults": faults or {},
        }
        self.address: tuple[str, int] | None = None
        self.migrated: dict[str, Any] | None = None
        self._listening = threading.Event()
        self._migrated = threading.Event()
        self.listeners.append(self._event)

    def _first_message(self) -> dict[str, object]:
        return self._request

    def _event(self, msg: dict[str, object]) -> None:
        if msg.get("ev") == "listening":
            self.address = (str(msg["host"]), int(msg["port"]))  # type: ignore[call-overload]
            self._listening.set()
        elif msg.get("ev") == "migrated_in":
            from pyhv.worker.config import VmConfig

            self.migrated = msg
            cfg = msg.get("config")
            if isinstance(cfg, dict):
                self.config = VmConfig.from_dict(cfg)
            self._migrated.set()

    def wait_listening(self, timeout: float = 30.0) -> tuple[str, int]:
        """The address the source must connect to."""
        if not self._listening.wait(timeout) or self.address is None:
            end = self.wait(0.5)
            raise MigrationError(
                "the destination worker is not listening"
                + (f": {end.describe()}" if end else f" after {timeout} s")
            )
        return self.address

    def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The migrated_in report once the VM runs here; None if it ended first or timed out."""
        for _ in range(2):
            if self._migrated.wait(0 if self.end else timeout):
                return self.migrated
            if self.end is not None:
                return None
        return None


def migrate_worker(
    worker: WorkerProcess,
    address: tuple[str, int],
    token: str,
    options: MigrationOptions | dict[str, Any] | None = None,
    on_progress: Callable[[dict[str, Any]], object] | None = None,
    timeout: float = 900.0,
    counters: CounterRegistry | None = None,
) -> dict[str, Any]:
    """Migrate the VM of a running worker process to `address`; returns the final progress
    report (the source worker then ends: "migrated to ..."). Raises MigrationError with the
    source's reason and phase if it failed (the VM runs on in `worker`). With `counters`,
    every progress report also goes to the "Hyper-V VM Live Migration" set (instance = VM)."""
    if isinstance(options, MigrationOptions):
        options = options.as_dict()
    done = threading.Event()
    box: dict[str, Any] = {}
    live = None if counters is None else register(counters)
    mid = id(done)

    def on_event(msg: dict[str, object]) -> None:
        if msg.get("ev") != "migration" or msg.get("id") != mid:
            return
        if "progress" in msg:
            if live is not None:
                publish(live, worker.config.name, msg["progress"])  # type: ignore[arg-type]
            if on_progress is not None:
                on_progress(msg["progress"])  # type: ignore[arg-type]
            return
        box.update(msg)
        done.set()

    worker.listeners.append(on_event)
    try:
        worker._send(
            {
                "op": "migrate",
                "id": mid,
                "host": address[0],
                "port": address[1],
                "token": token,
                "options": options or {},
            }
        )
        t = 0.0
        while not done.wait(0.5):
            t += 0.5
            if worker.end is not None and not done.wait(2.0):
                raise MigrationError(f"the source worker ended: {worker.end.describe()}")
            if t > timeout:
                raise MigrationError(f"the migration did not finish within {timeout} s")
    finally:
        worker.listeners.remove(on_event)
    if box.get("in_doubt"):
        err = MigrationInDoubt(str(box["error"]), "commit")
        err.migration_id = mid  # type: ignore[attr-defined]
        raise err
    if "error" in box:
        raise MigrationError(str(box["error"]), str(box.get("phase") or ""))
    return box["result"]  # type: ignore[no-any-return]


def decide_in_doubt(worker: WorkerProcess, migration_id: int, resume: bool) -> None:
    """After MigrationInDoubt from migrate_worker (its ``migration_id``): the owner asked the
    destination; resume the VM here (it does not run there) or stop it (it does)."""
    worker._send({"op": "migrate", "id": migration_id, "decision": "resume" if resume else "stop"})
