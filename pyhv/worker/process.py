"""One OS process per VM: start a worker (``python -m pyhv.worker``) and talk to it over a
local socket (pyhv.worker.protocol). :class:`WorkerProcess` offers the same calls as an
in-process :class:`~pyhv.worker.vm.VirtualMachine` (start, send, stop, wait, serial), so the
console and the VMMS can use either."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyhv.worker import protocol
from pyhv.worker.config import VmConfig
from pyhv.worker.console import SerialLog
from pyhv.worker.outcome import STOPPED, WORKER_ERROR, VmEnd

if TYPE_CHECKING:
    from pyhv.dynmem.status import MemoryStatus
    from pyhv.vmms.cgroup import MemoryCgroup
    from pyhv.worker.jail import Jail

log = logging.getLogger(__name__)


class WorkerProcess:
    """The owner's handle on a worker process running one VM."""

    def __init__(
        self,
        config: VmConfig,
        output: Callable[[bytes], None] | None = None,
        *,
        on_memory_status: Callable[[MemoryStatus], object] | None = None,
    ) -> None:
        self.config = config
        #: The VM's last memory status, as the worker pushed it (checked field by field).
        self.last_memory_status: MemoryStatus | None = None
        #: Memory statuses from the worker that did not decode (the worker is untrusted).
        self.refused_statuses = 0
        self._status_listeners: list[
            tuple[Callable[[MemoryStatus], object], Callable[[str], object] | None]
        ] = []
        if on_memory_status is not None:
            self._status_listeners.append((on_memory_status, None))
        self._calls: dict[int, tuple[threading.Event, list[dict[str, object]]]] = {}
        self._call_id = 0
        self.serial = SerialLog()
        self._output = output
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._end: VmEnd | None = None
        self._ended = threading.Event()
        self._started = threading.Event()
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        #: Called (on the reader thread) with every message of a kind not handled here.
        self.listeners: list[Callable[[dict[str, object]], object]] = []
        #: Run the worker under this command, e.g. ["ip", "netns", "exec", "hostB"].
        self.command_prefix: list[str] = []
        #: Start the worker in this jail (pyhv.worker.jail; the VMMS sets it when it runs as
        #: root), and put it in this memory cgroup before it runs any of its own code.
        self.jail: Jail | None = None
        self.cgroup: MemoryCgroup | None = None
        #: The VM's largest memory, for the jail's RLIMIT_FSIZE (default: from the config; an
        #: incoming worker has none until its VM arrives).
        self.max_file_bytes: int | None = None
        self._jailed_pid: int | None = None

    @property
    def pid(self) -> int | None:
        """The worker's pid (in a jail: the jailed Python process, not bwrap's)."""
        if self._jailed_pid is not None:
            return self._jailed_pid
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        """The worker process's exit code once it has exited (after close()); negative for a
        signal, in a jail too (bwrap exits with 128 + the signal of its child)."""
        code = self._proc.returncode if self._proc else None
        if self.jail is not None and code is not None and 128 < code < 128 + 65:
            return -(code - 128)
        return code

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-m", "pyhv.worker", "--fd", str(theirs.fileno())]
        try:
            if self.jail is None:
                self._proc = subprocess.Popen(
                    [*self.command_prefix, *argv], pass_fds=(theirs.fileno(),), env=dict(os.environ)
                )
            else:
                largest = self.max_file_bytes or max(self.config.memory, self.config.maximum)
                self._start_jailed(argv + [f"--confine={largest}"], theirs.fileno())
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        protocol.send(ours, self._first_message())
        self._reader = threading.Thread(target=self._read_loop, name="worker-reader", daemon=True)
        self._reader.start()

    def _start_jailed(self, argv: list[str], sock_fd: int) -> None:
        """Start the worker in its jail; put it in its memory cgroup before it execs."""
        import json

        from pyhv.worker import jail

        assert self.jail is not None
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        try:
            cmd = jail.command(self.jail, argv, info_fd=info_w, block_fd=block_r)
            self._proc = subprocess.Popen(
                [*self.command_prefix, *cmd], pass_fds=(sock_fd, info_w, block_r), env={}
            )
            os.close(info_w)
            os.close(block_r)
            info_w = block_r = -1
            raw, child = b"", None
            while child is None:  # bwrap writes one JSON object, {"child-pid": N, ...}
                chunk = os.read(info_r, 4096)
                if not chunk:
                    code = self._proc.wait(10)
                    raise OSError(f"the worker's jail did not start (bwrap exited with {code})")
                raw += chunk
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    child = int(json.loads(raw)["child-pid"])
            if self.cgroup is not None:
                try:
                    self.cgroup.add(child)
                except OSError:
                    # Before block_w closes: EOF on it would let the worker run, uncharged.
                    os.kill(child, signal.SIGKILL)
                    self._proc.kill()
                    raise
            self._jailed_pid = child
            os.write(block_w, b"go")  # now the worker may exec
        finally:
            for fd in (info_r, info_w, block_r, block_w):
                if fd >= 0:
                    os.close(fd)

    def _first_message(self) -> dict[str, object]:
        return {"op": "boot", "config": self.config.to_dict()}

    def _read_loop(self) -> None:
        assert self._sock is not None
        end: VmEnd | None = None
        try:
            while True:
                msg = protocol.recv(self._sock)
                if msg is None:
                    break
                ev = msg.get("ev")
                if ev == "serial":
                    data = protocol.decode_bytes(msg.get("data"))
                    self.serial.append(data)
                    if self._output is not None:
                        self._output(data)
                elif ev == "started":
                    self._started.set()
                elif ev == "memory":
                    call_id = msg.get("id")
                    waiter = self._calls.pop(call_id, None) if isinstance(call_id, int) else None
                    if waiter is not None:
                        waiter[1].append(msg)
                        waiter[0].set()
                elif ev == "memory_status":
                    self._memory_status(msg.get("status"))
                elif ev == "ended":
                    raw = msg.get("end")
                    if not isinstance(raw, dict):
                        raise protocol.ProtocolError("'ended' without an 'end' object")
                    end = VmEnd.from_dict(raw)
                else:
                    for listener in list(self.listeners):
                        listener(msg)
        except (OSError, ValueError) as e:
            end = end or VmEnd(WORKER_ERROR, detail=f"lost the worker's socket: {e}")
        if end is None:
            code = self._proc.wait() if self._proc else None
            end = VmEnd(
                WORKER_ERROR, detail=f"the worker process exited (code {code}) without a report"
            )
        self._end = end
        self.serial.close()
        self._ended.set()
        for event, _ in list(self._calls.values()):
            event.set()  # nobody will answer now

    def subscribe_memory_status(
        self,
        on_status: Callable[[MemoryStatus], object],
        on_refused: Callable[[str], object] | None = None,
    ) -> None:
        """Call `on_status` with every memory status the worker pushes (on the reader thread),
        and `on_refused` with the reason for every one that does not decode."""
        self._status_listeners.append((on_status, on_refused))

    def _memory_status(self, raw: object) -> None:
        from pyhv.dynmem.status import MemoryStatus, StatusError

        try:
            status = MemoryStatus.from_wire(raw)
        except StatusError as e:
            self.refused_statuses += 1
            log.warning("VM %s: worker pid %s: refused %s", self.config.name, self.pid, e)
            for _, on_refused in list(self._status_listeners):
                if on_refused is not None:
                    self._call(on_refused, str(e))
            return
        self.last_memory_status = status
        for on_status, _ in list(self._status_listeners):
            self._call(on_status, status)

    def _call(self, listener: Callable[[Any], object], arg: object) -> None:
        try:
            listener(arg)
        except Exception:  # noqa: BLE001 - a listener's bug must not end the reader
            log.exception("VM %s: memory status listener failed", self.config.name)

    def send(self, data: bytes) -> None:
        """Type ``data`` into the VM's serial port."""
        for i in range(0, len(data), 32 << 10):
            self._send({"op": "serial", "data": protocol.encode_bytes(data[i : i + 32 << 10])})

    def stop(self, why: str = "stopped by its owner") -> None:
        """Ask the worker to stop the VM (as VirtualMachine.stop, e.g. the console's Ctrl-A x);
        wait() then reports it stopped, with `why`."""
        self._send({"op": "stop", "why": why})

    # --- Dynamic Memory: the same calls as VirtualMachine's, over the socket -------------

    def _memory(
        self, call: str, value: int | list[int] | None = None, timeout: float = 30.0
    ) -> Any:
        from pyhv.worker.dynmem import DynamicMemoryError

        event, box = threading.Event(), list[dict[str, object]]()
        with self._send_lock:
            self._call_id += 1
            call_id = self._call_id
        self._calls[call_id] = (event, box)
        self._send({"op": "memory", "id": call_id, "call": call, "value": value})
        if not event.wait(timeout) or not box:
            self._calls.pop(call_id, None)
            raise DynamicMemoryError(
                f"memory {call}: the worker did not answer"
                + (" (the VM has ended)" if self._ended.is_set() else f" in {timeout} s")
            )
        reply = box[0]
        if "error" in reply:
            raise DynamicMemoryError(str(reply["error"]))
        return reply.get("result")

    def memory_status(self) -> dict[str, Any]:
        """As VirtualMachine.memory_status (the operator's view), asked of the worker process.
        The VMMS does not ask: it reads what the worker pushed (subscribe_memory_status)."""
        return self._memory("status")  # type: ignore[no-any-return]

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        return self._memory("target", target_bytes)  # type: ignore[no-any-return]

    def set_memory_limits(self, minimum: int, maximum: int) -> dict[str, Any]:
        """As VirtualMachine.set_memory_limits, in the worker process."""
        return self._memory("limits", [minimum, maximum])  # type: ignore[no-any-return]

    def add_memory(self, pages: int) -> dict[str, Any]:
        return self._memory("add", pages)  # type: ignore[no-any-return]

    def remove_memory(self, pages: int) -> dict[str, Any]:
        return self._memory("remove", pages)  # type: ignore[no-any-return]

    def _send(self, msg: dict[str, object]) -> None:
        if self._sock is None or self._ended.is_set():
            return
        with self._send_lock:
            try:
                protocol.send(self._sock, msg)
            except OSError:
                pass  # the reader reports the worker's end

    def wait(self, timeout: float | None = None) -> VmEnd | None:
        """How the VM ended, or None if it is still running after ``timeout`` seconds."""
        if not self._ended.wait(timeout):
            return None
        return self._end

    @property
    def end(self) -> VmEnd | None:
        return self._end

    def close(self, timeout: float = 5.0) -> None:
        """Stop the VM if it runs, and reap the process (killing it if it does not exit)."""
        if not self._ended.is_set():
            self.stop()
            self._ended.wait(timeout)
        if self._sock is not None:
            self._sock.close()
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self._jailed_pid is not None:  # pid 1 of its namespace: all of it goes
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self._jailed_pid, signal.SIGKILL)
                self._proc.kill()
                self._proc.wait()
        if self._end is None:
            self._end = VmEnd(STOPPED, detail="worker closed")
            self._ended.set()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
