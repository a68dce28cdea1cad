"""Live migration between worker processes (one OS process per VM, pyhv.worker).

In the worker (server side), with the messages of pyhv.worker.messages:

- ``Migrate`` starts an outgoing migration on a thread; progress comes back as
  ``MigrationProgress``, the end as ``MigrationDone`` (then the VM stops: "migrated to h:p") or
  ``MigrationFailed`` with the phase (the VM runs on). With the option ``resume_in_doubt``
  false, a connection lost after COMMIT is reported as ``MigrationFailed`` with ``in_doubt``
  and the VM paused; the owner then sends a ``MigrationDecision``, ``stop`` or ``resume``
  (stop: the VM runs at the destination; resume: it does not).
- A worker whose first message is ``Incoming`` is a destination: it answers ``Listening``,
  takes one migration, and from then on is an ordinary worker of the migrated VM
  (``MigratedIn`` then ``Started``); if the migration fails it reports ``Ended`` and exits.

On the owner's side, :class:`IncomingWorker` starts a destination worker and
:func:`migrate_worker` drives a source worker.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from pyhv.migration.counters import publish, register
from pyhv.migration.destination import Incoming, listen
from pyhv.migration.source import MigrationInDoubt, MigrationOptions, Source
from pyhv.migration.stream import MigrationError, warm_up
from pyhv.worker import messages as m
from pyhv.worker.outcome import WORKER_ERROR, VmEnd
from pyhv.worker.process import WorkerProcess

if TYPE_CHECKING:
    from pyhv.counters.registry import CounterRegistry
    from pyhv.worker.config import VmConfig
    from pyhv.worker.vm import VirtualMachine

Send = Callable[[Any], None]

# --- inside the worker process ------------------------------------------------------------


class OwnerGuard:
    """A destination worker's owner, as the arrival sees it (``Incoming`` with ``confirm``):
    the VM resumes here only once the owner said Resume; the owner's going away (or Stop)
    before that aborts the arrival at once, whatever phase it is in."""

    def __init__(self) -> None:
        self._decided = threading.Event()
        self._lock = threading.Lock()
        self.why = ""
        self._sockets: list[Any] = []

    def watch(self, sock: Any) -> None:
        """Shut `sock` down (waking whoever waits on it) if the owner goes away."""
        with self._lock:
            self._sockets.append(sock)
            gone = bool(self.why)
        if gone:
            _shut(sock)

    def resume(self) -> None:
        self._decided.set()

    def abort(self, why: str) -> None:
        with self._lock:
            self.why = why
            sockets = list(self._sockets)
        self._decided.set()
        for sock in sockets:
            _shut(sock)

    def confirmed(self, timeout: float) -> bool:
        """Wait for the owner's word: True to resume, False (``why`` says) not to."""
        if not self._decided.wait(timeout):
            self.abort(f"its owner did not confirm the VM within {timeout:g} s")
        return not self.why


def _shut(sock: Any) -> None:
    import socket

    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class WorkerIncoming:
    """The destination's hooks as the worker's serve() uses them."""

    def __init__(
        self,
        incoming: Incoming,
        config: dict[str, Any],
        guard: OwnerGuard | None = None,
        send: Send | None = None,
    ) -> None:
        self.incoming = incoming
        self.config = config
        self.vm: VirtualMachine | None = None
        self.guard = guard
        self._send = send
        self._authorized = False

    def ram_ready(self, vm: VirtualMachine) -> None:
        self._hooks(vm)
        self.incoming.ram_ready(vm)

    def abandon(self, error: BaseException) -> None:
        self.incoming.abandon(error)

    def receive(self, vm: VirtualMachine) -> None:
        self._hooks(vm)
        self.incoming.receive(vm)

    def _hooks(self, vm: VirtualMachine) -> None:
        self.vm = vm
        if self.guard is not None and self._send is not None:
            self.incoming.authorize = self._authorize  # at PREPARE, before the source pauses
            self.incoming.gate = self._confirm  # between the commit and the VPs running

    def _authorize(self) -> None:
        assert self.guard is not None and self._send is not None
        # Committed: the VM is about to be whole here (the source pauses next). It resumes
        # only once the owner has made it its own (durably); without that word the source
        # keeps it. Asked at PREPARE, this round trip to the owner is out of the pause.
        self._send(m.Committed(self.config))
        if not self.guard.confirmed(self.incoming.timeout):
            err = MigrationError(f"not resumed here: {self.guard.why}", "commit")
            self.incoming.fail(err)
            raise err
        self._authorized = True

    def _confirm(self) -> None:
        assert self.guard is not None
        if not self._authorized:  # no PREPARE (post-copy): the round trip here, in the pause
            self._authorize()
        elif self.guard.why:  # it said Stop, or went away, since (no round trip: a look)
            err = MigrationError(f"not resumed here: {self.guard.why}", "commit")
            self.incoming.fail(err)
            raise err

    def resumed(self, send: Send) -> None:
        vm = self.vm
        self.incoming.resumed(vm, vm.running_since if vm is not None else None)
        inc = self.incoming
        send(m.MigratedIn(self.config, inc.peer, inc.passes, inc.pages))


def _ended(send: Send, detail: str) -> None:
    send(m.Ended(m.EndReport.of(VmEnd(WORKER_ERROR, detail=detail))))


def accept_incoming(
    first: m.Incoming, send: Send, guard: OwnerGuard | None = None
) -> tuple[WorkerIncoming | None, m.Boot]:
    """Listen, report the port, take one source up to its configuration. Returns the hooks and
    the boot message to go on with, or (None, an empty Boot) after reporting the failure. With
    `guard`, the owner's going away aborts it wherever it is."""
    from pyhv.worker.config import ConfigError, VmConfig

    nothing = m.Boot({}, m.PROTOCOL_VERSION)
    try:
        lst = listen(first.listen[0], first.listen[1])
    except (MigrationError, OSError, ValueError) as e:
        _ended(send, f"incoming migration: cannot listen: {e}")
        return None, nothing
    if guard is not None:
        guard.watch(lst)
    bound = lst.getsockname()
    warm_up()  # the handshake's crypto, before any source can connect
    send(m.Listening(bound[0], bound[1]))
    try:
        inc = Incoming(
            lst,
            first.token,
            max_memory=first.max_memory,
            timeout=first.timeout,
            accept_timeout=first.accept_timeout,
            faults=first.faults or None,
            userfault_device=first.userfaultfd,
            recover_timeout=first.recover_timeout,
        )
    except (MigrationError, ValueError) as e:
        lst.close()
        _ended(send, f"incoming migration: {e}")
        return None, nothing
    try:
        config = inc.accept()
        if guard is not None:
            assert inc.fs is not None
            guard.watch(inc.fs.sock)
        if first.image is not None:  # the owner's own file, whatever path the source sent
            config["image"] = first.image
        config["page_file"] = first.page_file or ""  # a file of this host, never the source's
        try:
            VmConfig.from_dict(config)
        except (ConfigError, KeyError, TypeError, ValueError) as e:
            err = MigrationError(f"this host cannot run the VM's configuration: {e}", "config")
            inc.fail(err)
            raise err from None
    except Exception as e:  # noqa: BLE001 - reported to the owner, who decides
        _ended(send, f"incoming migration failed: {e}")
        return None, nothing
    boot = m.Boot(config, m.PROTOCOL_VERSION, adoption_secret=first.adoption_secret)
    return WorkerIncoming(inc, config, guard, send), boot


_busy = threading.Lock()
#: Migrations in doubt, waiting for the owner's decision: id -> (event, [decision]).
_decisions: dict[int, tuple[threading.Event, list[str]]] = {}
#: The outgoing migration in flight (its id), for a new owner (pyhv.worker.adoption).
_current: list[int] = []


def in_flight() -> tuple[int | None, bool]:
    """(the id of the outgoing migration in flight or None, whether it waits in doubt)."""
    mid = _current[0] if _current else None
    waiting = mid is not None and mid in _decisions and _doubtful.get(mid, False)
    return mid, waiting


_doubtful: dict[int, bool] = {}


def _await_decision(vm: VirtualMachine, mid: int) -> str:
    event, box = _decisions[mid]
    try:
        while not event.wait(1.0):
            if vm.end is not None:  # stopped meanwhile (the owner went away)
                return "stop"
        return box[0]
    finally:
        _decisions.pop(mid, None)


def start_migration(vm: VirtualMachine, msg: m.Migrate | m.MigrationDecision, send: Send) -> None:
    """Run one outgoing migration on a thread of its own, reporting to the owner (or take the
    owner's decision on a migration in doubt)."""
    mid = msg.id
    if isinstance(msg, m.MigrationDecision):
        waiter = _decisions.get(mid)
        if waiter is not None:
            waiter[1].append(msg.decision)
            waiter[0].set()
        return

    def run() -> None:
        if not _busy.acquire(blocking=False):
            send(m.MigrationFailed(mid, "a migration is already running"))
            return
        try:
            opts = MigrationOptions.from_dict(dict(msg.options))
            src = Source(
                vm,
                (msg.host, msg.port),
                msg.token,
                opts,
                on_progress=lambda p: send(m.MigrationProgress(mid, p)),
            )
            _decisions[mid] = (threading.Event(), [])
            _current[:] = [mid]
            result = src.run()
        except MigrationInDoubt as e:
            _doubtful[mid] = True
            send(m.MigrationFailed(mid, str(e), e.phase, in_doubt=True))
            if _await_decision(vm, mid) == "resume":
                src.resume_here()
            else:
                src.clean_up()
        except MigrationError as e:
            send(m.MigrationFailed(mid, str(e), e.phase))
        except (KeyError, TypeError, ValueError) as e:
            send(m.MigrationFailed(mid, f"bad migrate request: {e}"))
        else:
            send(m.MigrationDone(mid, result))
            src.clean_up()
        finally:
            _decisions.pop(mid, None)
            _doubtful.pop(mid, None)
            _current.clear()
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
        image: str | None = None,
        page_file: str | None = None,
        confirm: bool = False,
        recover_timeout: float = 60.0,
    ) -> None:
        super().__init__(config, output)  # type: ignore[arg-type]  # known once migrated in
        self._request = m.Incoming(
            token,
            m.PROTOCOL_VERSION,
            listen=listen,
            max_memory=max_memory,
            timeout=timeout,
            accept_timeout=accept_timeout,
            faults=faults or {},
            image=image,
            page_file=page_file,
            confirm=confirm,
            recover_timeout=recover_timeout,
        )
        self._uffd_device = -1
        #: With `confirm`: called (on the reader thread) with the arrived VM's configuration
        #: once the source committed; True lets the worker resume (the owner recorded the VM
        #: as its own), False stops it (the source keeps the VM). Default: resume.
        self.on_committed: Callable[[dict[str, Any]], bool] = lambda config: True
        self.address: tuple[str, int] | None = None
        self.migrated: dict[str, Any] | None = None
        self._listening = threading.Event()
        self._migrated = threading.Event()
        self.listeners.append(self._event)

    def start(self) -> None:
        # Post-copy registers guest RAM with userfaultfd; a jailed worker's uid may not create
        # one for kernel (KVM) faults, so the owner opens /dev/userfaultfd and passes it.
        try:
            self._uffd_device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            self._uffd_device = -1  # an older kernel, or no right to it: the syscall then
        if self._uffd_device >= 0:
            self.pass_fds.append(self._uffd_device)
            self._request = msgspec.structs.replace(self._request, userfaultfd=self._uffd_device)
        try:
            super().start()
        finally:
            if self._uffd_device >= 0:
                os.close(self._uffd_device)
                self._uffd_device = -1

    def _first_message(self) -> m.Incoming:
        if self.adoption is None:
            return self._request
        return msgspec.structs.replace(self._request, adoption_secret=self.adoption[1])

    def _event(self, msg: m.Event) -> None:
        if isinstance(msg, m.Listening):
            self.address = (msg.host, msg.port)
            self._listening.set()
        elif isinstance(msg, m.Committed):
            try:
                go = self.on_committed(msg.config)
            except Exception:  # noqa: BLE001 - not confirmed: the source keeps the VM
                logging.getLogger(__name__).exception("confirming the arrived VM failed")
                go = False
            self._send(m.Resume() if go else m.Stop("its owner could not record it"))
        elif isinstance(msg, m.MigratedIn):
            from pyhv.worker.config import VmConfig

            self.migrated = msgspec.structs.asdict(msg)
            self.config = VmConfig.from_dict(msg.config)
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

    def on_event(msg: m.Event) -> None:
        if isinstance(msg, m.MigrationProgress) and msg.id == mid:
            if live is not None:
                publish(live, worker.config.name, msg.progress)
            if on_progress is not None:
                on_progress(msg.progress)
        elif isinstance(msg, m.MigrationDone | m.MigrationFailed) and msg.id == mid:
            box["end"] = msg
            done.set()

    worker.listeners.append(on_event)
    try:
        worker._send(m.Migrate(mid, address[0], address[1], token, options or {}))
        t = 0.0
        while not done.wait(0.5):
            t += 0.5
            if worker.end is not None and not done.wait(2.0):
                raise MigrationError(f"the source worker ended: {worker.end.describe()}")
            if t > timeout:
                raise MigrationError(f"the migration did not finish within {timeout} s")
    finally:
        worker.listeners.remove(on_event)
    end = box["end"]
    if isinstance(end, m.MigrationFailed):
        if end.in_doubt:
            err = MigrationInDoubt(end.error, "commit")
            err.migration_id = mid  # type: ignore[attr-defined]
            raise err
        raise MigrationError(end.error, end.phase)
    return end.result  # type: ignore[no-any-return]


def decide_in_doubt(worker: WorkerProcess, migration_id: int, resume: bool) -> None:
    """After MigrationInDoubt from migrate_worker (its ``migration_id``): the owner asked the
    destination; resume the VM here (it does not run there) or stop it (it does)."""
    worker._send(m.MigrationDecision(migration_id, "resume" if resume else "stop"))
