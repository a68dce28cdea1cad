"""The VMMS's side of workers that outlive it: what it records of each worker it starts, and
how a restarted VMMS adopts the ones still running (pyhv.worker.adoption is the worker's side).

For each running VM the VMMS keeps, in ``STATE/run/`` (0700, root's when it runs as root):
``NAME.sock``, the listening Unix socket the worker took at start (the path is never inside
the jail; the worker got the fd), and ``NAME.json``, its record (written atomically): the
worker's host pid and its start time from ``/proc/PID/stat`` (so a reused pid is not taken for
it), the socket, the adoption secret, its jail uid and memory cgroup, and whether a migration
was under way. A restarted VMMS reads the records: a worker whose pid still runs with that
start time is adopted (:class:`AdoptedWorker`: hello with the secret, it answers what it is
and goes on streaming); the others are marked off, with why.

An adopted worker is not the new VMMS's child: its end is seen as EOF on its socket, and it
is signalled and waited for through a pidfd (``os.pidfd_open``), which a reused pid cannot
redirect.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import signal
import socket
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from pyhv.vmms.store import write_atomically
from pyhv.worker import protocol
from pyhv.worker.config import ConfigError, VmConfig
from pyhv.worker.process import WorkerProcess

log = logging.getLogger(__name__)

#: How long an adopted worker has to answer a hello (seconds).
ADOPT_TIMEOUT_S = 10.0


class AdoptionError(RuntimeError):
    """A recorded worker could not be adopted (gone, or it refused: the message says)."""


@dataclass
class WorkerRecord:
    """What the VMMS keeps of one running worker (``STATE/run/NAME.json``)."""

    name: str
    pid: int
    start_time: int
    socket: str
    secret: str
    jail_uid: int | None = None
    cgroup: str | None = None
    cgroup_version: int = 0
    #: An outgoing migration was under way (its worker may have migrated the VM meanwhile).
    migrating: bool = False
    #: The incoming migration it arrived by, until the VMMS saw it run here ("" after).
    incoming: str = ""

    @classmethod
    def from_dict(cls, raw: Any) -> WorkerRecord:
        names = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or not {"name", "pid", "start_time"} <= set(raw) <= names:
            raise ValueError(
                f"not a worker record: fields {sorted(raw) if isinstance(raw, dict) else raw!r}"
            )
        rec = cls(**raw)
        if not (isinstance(rec.pid, int) and rec.pid > 0 and isinstance(rec.start_time, int)):
            raise ValueError(f"bad pid {rec.pid!r} or start time {rec.start_time!r}")
        return rec


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, /proc/PID/stat field 22), or None if
    there is no such process: with the pid, it names one process for good."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def age(start: int) -> float:
    """Seconds since a process of start time `start` (clock ticks after boot) started."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime - start / os.sysconf("SC_CLK_TCK"))


def alive(rec: WorkerRecord) -> bool:
    """The recorded worker still runs (same pid, same start time, not a zombie)."""
    if start_time(rec.pid) != rec.start_time:
        return False
    try:
        state = Path(f"/proc/{rec.pid}/stat").read_bytes()
    except OSError:
        return False
    return state[state.rfind(b")") + 2 :][:1] != b"Z"


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """`path` as a Unix socket address: through /proc/self/fd for a long one (sun_path holds
    108 bytes; a test's state directory may be deeper)."""
    if len(os.fsencode(str(path))) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class RunDirectory:
    """``STATE/run``: each running worker's adoption socket and record."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "run"
        self.path.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        self._lock = threading.Lock()

    def socket_path(self, name: str) -> Path:
        return self.path / f"{name}.sock"

    def listen(self, name: str) -> socket.socket:
        """A fresh listening socket for VM `name`'s worker (owner-only)."""
        path = self.socket_path(name)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(path.lstat().st_mode):
                path.unlink()  # left by a worker that is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short(path) as address:
                sock.bind(address)
            os.chmod(path, 0o600)
            sock.listen(4)
        except BaseException:
            sock.close()
            raise
        return sock

    def has(self, name: str) -> bool:
        return (self.path / f"{name}.json").exists()

    def save(self, rec: WorkerRecord) -> None:
        # Atomic against the VMMS's death, not fsync'd (~8 ms of every VM's start here): a
        # record only has to outlive the VMMS; the host's crash takes its workers along.
        with self._lock:
            path = self.path / f"{rec.name}.json"
            write_atomically(path, json.dumps(asdict(rec), indent=1), sync=False)

    def update(self, name: str, **changes: Any) -> None:
        """Change fields of VM `name`'s record, if it has one (an OSError is logged: the VM
        runs on, its record as it was)."""
        with self._lock:
            path = self.path / f"{name}.json"
            try:
                raw = json.loads(path.read_text())
            except (OSError, ValueError):
                return
            raw.update(changes)
            try:
                write_atomically(path, json.dumps(raw, indent=1), sync=False)
            except OSError as e:
                log.warning("VM %s: its worker record could not be updated: %s", name, e)

    def delete(self, name: str) -> None:
        with self._lock:
            (self.path / f"{name}.json").unlink(missing_ok=True)
            self.socket_path(name).unlink(missing_ok=True)

    def load_all(self) -> list[tuple[str, WorkerRecord | None, str]]:
        """(file name, record or None, why not) for each record."""
        out: list[tuple[str, WorkerRecord | None, str]] = []
        for path in sorted(self.path.glob("*.json")):
            try:
                out.append((path.name, WorkerRecord.from_dict(json.loads(path.read_text())), ""))
            except (OSError, ValueError, TypeError) as e:
                out.append((path.name, None, str(e)))
        return out


class AdoptedWorker(WorkerProcess):
    """A new owner's handle on a running worker another VMMS started: the same calls as a
    WorkerProcess; `adopted` is what the worker said it is."""

    def __init__(self, rec: WorkerRecord, output: Callable[[bytes], None] | None = None) -> None:
        super().__init__(None, output)  # type: ignore[arg-type]  # its config comes with hello
        self.record = rec
        self.adopted: Any = None
        self._pidfd: int | None = None

    @property
    def pid(self) -> int | None:
        return self.record.pid

    @property
    def returncode(self) -> int | None:
        return None  # not our child: its exit status goes to its own parent

    def start(self) -> None:
        """Connect, say hello, read what the worker is; AdoptionError if it cannot be adopted
        (gone, a wrong secret or version, an answer that does not decode)."""
        from pyhv.worker import messages as m

        rec = self.record
        if not alive(rec):
            raise AdoptionError(f"its worker (pid {rec.pid}) is gone")
        try:
            self._pidfd = os.pidfd_open(rec.pid)
        except OSError as e:
            raise AdoptionError(f"pidfd_open({rec.pid}): {e}") from None
        if not alive(rec):  # the pid was reused between the look and the pidfd
            self._close_pidfd()
            raise AdoptionError(f"its worker (pid {rec.pid}) is gone")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(ADOPT_TIMEOUT_S)
        try:
            with _short(Path(rec.socket)) as address:
                sock.connect(address)
            protocol.send_message(sock, m.Hello(m.PROTOCOL_VERSION, rec.secret))
            raw = protocol.recv_frame(sock)
            if raw is None:
                raise AdoptionError("the worker closed the connection without an answer")
            answer = m.decode_event(raw)
            if isinstance(answer, m.Refused):
                raise AdoptionError(f"the worker refused adoption: {answer.why}")
            if not isinstance(answer, m.Adopted):
                raise AdoptionError(f"the worker answered {type(answer).__name__}, not adopted")
            m.check_version(answer.protocol, f"the worker (pid {rec.pid})")
            config = VmConfig.from_dict(answer.config)
            if config.name != rec.name:
                raise AdoptionError(f"the worker runs VM {config.name!r}, not {rec.name!r}")
        except (OSError, protocol.FrameRefused, m.MessageError, ConfigError) as e:
            sock.close()
            self._close_pidfd()
            raise AdoptionError(f"{type(e).__name__}: {e}" if not str(e) else str(e)) from None
        except AdoptionError:
            sock.close()
            self._close_pidfd()
            raise
        sock.settimeout(None)
        self.config, self.adopted, self._sock = config, answer, sock
        self.last_memory_status = answer.memory
        self._started.set()
        self._reader = threading.Thread(target=self._read_loop, name="worker-reader", daemon=True)
        self._reader.start()

    def exited(self, timeout: float) -> bool:
        """The process has exited (its pidfd became readable) within `timeout` seconds."""
        if self._pidfd is None:
            return True
        return bool(select.select([self._pidfd], [], [], timeout)[0])

    def close(self, timeout: float = 5.0) -> None:
        """Stop the VM if it runs, then make sure the process is gone (SIGKILL through the
        pidfd: never another process that got its pid)."""
        if not self._ended.is_set():
            self.stop()
            self._ended.wait(timeout)
        if self._sock is not None:
            self._sock.close()
        if self._pidfd is not None and not self.exited(timeout):
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            self.exited(timeout)
        self._close_pidfd()
        if self._end is None:
            from pyhv.worker.outcome import STOPPED, VmEnd

            self._end = VmEnd(STOPPED, detail="worker closed")
            self._ended.set()

    def _close_pidfd(self) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
