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
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

from pyhv.worker import protocol
from pyhv.worker.config import VmConfig
from pyhv.worker.console import SerialLog
from pyhv.worker.outcome import STOPPED, WORKER_ERROR, VmEnd

if TYPE_CHECKING:
    from pyhv.dynmem.status import MemoryStatus
    from pyhv.memory.hugeram import HugeRam
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
        #: Messages from the worker that did not decode (the worker is untrusted).
        self.refused_messages = 0
        #: Messages of ours the worker refused (it said why in a Refused message).
        self.refused_by_worker = 0
        self._refused_by_worker_listeners: list[Callable[[str], object]] = []
        self._status_listeners: list[
            tuple[Callable[[MemoryStatus], object], Callable[[str], object] | None]
        ] = []
        if on_memory_status is not None:
            self._status_listeners.append((on_memory_status, None))
        self._calls: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._call_id = 0
        self.serial = SerialLog()
        self._output = output
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.pass_fds: list[int] = []  #: more fds the worker inherits (named in its first message)
        self._end: VmEnd | None = None
        self._ended = threading.Event()
        self._started = threading.Event()
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        #: Called (on the reader thread) with every declared message (pyhv.worker.messages)
        #: of a kind not handled here (migration's).
        self.listeners: list[Callable[[Any], object]] = []
        #: Called (on the reader thread) with each batch of flight recorder events; trace().
        self.trace_listeners: list[Callable[[list[Any]], object]] = []
        self.refused_traces = 0
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
        #: The Smart Paging file (fd, bytes it backs) the worker inherits (the VMMS opens it,
        #: and closes its copy once the worker has started: pyhv.vmms.smartpaging).
        self.smart_paging: tuple[int, int] | None = None
        #: The private tmpfs for `huge_pages` RAM (pyhv.memory.hugeram), mounted by the owner
        #: for a jailed worker, which cannot mount; the worker inherits its fd and the owner
        #: closes it once the worker has started.
        self.huge_ram: HugeRam | None = None
        #: (a listening Unix socket, the secret): the worker outlives its owner and a new one
        #: may adopt it there (pyhv.worker.adoption; the VMMS sets it). None: it stops its VM
        #: when this handle's socket closes, as `pyhv run --process` wants.
        self.adoption: tuple[socket.socket, str] | None = None
        #: Called once the process exists (its pid known) and before it is told what to run:
        #: the VMMS records it there, so no worker ever runs a VM unrecorded.
        self.on_spawned: Callable[[], object] | None = None

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
        fds = [theirs.fileno()]
        if self.adoption is not None:
            fds.append(self.adoption[0].fileno())
            argv.append(f"--adopt-fd={fds[1]}")
        fds += self.pass_fds
        if self.smart_paging is not None:
            fds.append(self.smart_paging[0])
        if self.huge_ram is not None:
            fds.append(self.huge_ram.mount_fd)
            argv.append(f"--huge-ram-fd={self.huge_ram.mount_fd}")
        try:
            if self.jail is None:
                self._proc = subprocess.Popen(
                    [*self.command_prefix, *argv],
                    pass_fds=fds,
                    env=dict(os.environ),
                    # Its own session: a Ctrl-C meant for the VMMS does not reach a worker that
                    # is to outlive it.
                    start_new_session=self.adoption is not None,
                )
            else:
                largest = self.max_file_bytes or max(
                    self.config.memory, self.config.maximum, self.config.page_file_size
                )
                self._start_jailed([*argv, f"--confine={largest}"], fds)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if self.huge_ram is not None:
                self.huge_ram.close()  # the worker holds the mount now
            if self.adoption is not None:
                self.adoption[0].close()  # the worker holds it now
        self._sock = ours
        if self.on_spawned is not None:
            try:
                self.on_spawned()
            except BaseException:
                self.close(1.0)
                raise
        protocol.send_message(ours, self._first_message())
        self._reader = threading.Thread(target=self._read_loop, name="worker-reader", daemon=True)
        self._reader.start()

    def _start_jailed(self, argv: list[str], fds: list[int]) -> None:
        """Start the worker in its jail; put it in its memory cgroup before it execs."""
        import json

        from pyhv.worker import jail

        assert self.jail is not None
        info_r, info_w = os.pipe()
        block_r, block_w = os.pipe()
        try:
            cmd = jail.command(self.jail, argv, info_fd=info_w, block_fd=block_r)
            self._proc = subprocess.Popen(
                [*self.command_prefix, *cmd], pass_fds=(*fds, info_w, block_r), env={}
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

    def _first_message(self) -> Any:
        from pyhv.worker.messages import PROTOCOL_VERSION, Boot, SmartPagingFd

        sp = None if self.smart_paging is None else SmartPagingFd(*self.smart_paging)
        secret = None if self.adoption is None else self.adoption[1]
        return Boot(
            self.config.to_dict(), PROTOCOL_VERSION, smart_paging=sp, adoption_secret=secret
        )

    def _read_loop(self) -> None:
        from pyhv.worker import messages as m

        assert self._sock is not None
        box: list[VmEnd] = []

        def serial(msg: m.SerialOut) -> None:
            self.serial.append(msg.data)
            if self._output is not None:
                self._output(msg.data)

        def started(msg: m.Started) -> None:
            m.check_version(msg.protocol, f"the worker (pid {self.pid})")
            self._started.set()

        def memory(msg: m.MemoryReply) -> None:
            waiter = self._calls.pop(msg.id, None)
            if waiter is not None:
                waiter[1].append(msg)
                waiter[0].set()

        def refused(msg: m.Refused) -> None:
            self.refused_by_worker += 1
            log.warning(
                "VM %s: worker pid %s refused our message: %s", self.name, self.pid, msg.why
            )
            for listener in list(self._refused_by_worker_listeners):
                self._call(listener, msg.why)

        # One handler per declared event; the others go to the listeners (migration's).
        handlers: dict[type, Callable[[Any], object]] = {
            m.SerialOut: serial,
            m.Started: started,
            m.MemoryReply: memory,
            m.MemoryStatusPushed: lambda msg: self._memory_status(msg.status),
            m.Ended: lambda msg: box.append(msg.end.to_end()),
            m.Refused: refused,
            m.TraceEvents: lambda msg: self._trace_events(msg.events),  # flight recorder
        }
        try:
            while True:
                try:
                    raw = protocol.recv_frame(self._sock)
                    if raw is None:
                        break
                    msg = m.decode_event(raw)
                except (protocol.FrameRefused, m.MessageError) as e:
                    self._refused(str(e))
                    continue
                handler = handlers.get(type(msg))
                if handler is not None:
                    handler(msg)
                else:
                    for listener in list(self.listeners):
                        listener(msg)
        except m.MessageError as e:  # a worker of another protocol version
            box.append(VmEnd(WORKER_ERROR, detail=str(e)))
            if self._proc is not None:
                self._proc.kill()
        except (OSError, ValueError) as e:
            box.append(VmEnd(WORKER_ERROR, detail=f"lost the worker's socket: {e}"))
        end = box[0] if box else None
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

    @property
    def name(self) -> str:
        return self.config.name if self.config is not None else "(incoming)"

    def _refused(self, why: str) -> None:
        """A message from the worker did not decode: logged, counted, told to the listeners
        (the VMMS's "Refused Messages" counter); the reader goes on."""
        self.refused_messages += 1
        log.warning("VM %s: worker pid %s: %s", self.name, self.pid, why)
        for _, on_refused in list(self._status_listeners):
            if on_refused is not None:
                self._call(on_refused, why)

    def subscribe_memory_status(
        self,
        on_status: Callable[[MemoryStatus], object],
        on_refused: Callable[[str], object] | None = None,
        on_refused_by_worker: Callable[[str], object] | None = None,
    ) -> None:
        """Call `on_status` with every memory status the worker pushes (on the reader thread),
        `on_refused` with the reason for every message of the worker that does not decode, and
        `on_refused_by_worker` with the worker's reason for every message of ours it refused."""
        self._status_listeners.append((on_status, on_refused))
        if on_refused_by_worker is not None:
            self._refused_by_worker_listeners.append(on_refused_by_worker)

    def _memory_status(self, status: MemoryStatus) -> None:
        self.last_memory_status = status
        for on_status, _ in list(self._status_listeners):
            self._call(on_status, status)

    def _call(self, listener: Callable[[Any], object], arg: object) -> None:
        try:
            listener(arg)
        except Exception:  # noqa: BLE001 - a listener's bug must not end the reader
            log.exception("VM %s: memory status listener failed", self.name)

    # --- flight recorder (pyhv.trace): the trace messages of pyhv.worker.protocol -----------

    def trace(self, on: bool, kinds: Collection[str] | None = None) -> None:
        """Ask the worker to stream its VM's events of `kinds` (None: all) to
        `trace_listeners`, with only those sources on; or to stop."""
        from pyhv.worker.messages import Trace

        self._send(Trace(on, None if kinds is None else sorted(kinds)))

    def _trace_events(self, raw: object) -> None:
        from pyhv.trace.events import TraceError, event_from_wire

        try:
            if not isinstance(raw, list):
                raise TraceError(f"'events' is a {type(raw).__name__}, not a list")
            events = [event_from_wire(e) for e in raw]
        except TraceError as e:  # the worker is untrusted: count, log, keep reading
            self.refused_traces += 1
            log.warning(
                "VM %s: worker pid %s: refused trace events: %s", self.config.name, self.pid, e
            )
            return
        for listener in list(self.trace_listeners):
            self._call(listener, events)

    # --- end flight recorder ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Type ``data`` into the VM's serial port."""
        from pyhv.worker.messages import SerialIn

        step = 32 << 10  # (i + 32 << 10 would be (i + 32) << 10: later chunks sent again)
        for i in range(0, len(data), step):
            self._send(SerialIn(data[i : i + step]))

    def stop(self, why: str = "stopped by its owner") -> None:
        """Ask the worker to stop the VM (as VirtualMachine.stop, e.g. the console's Ctrl-A x);
        wait() then reports it stopped, with `why`."""
        from pyhv.worker.messages import Stop

        self._send(Stop(why))

    # --- Dynamic Memory: the same calls as VirtualMachine's, over the socket -------------

    def _memory(
        self, call: str, value: int | tuple[int, int] | None = None, timeout: float = 30.0
    ) -> Any:
        from pyhv.worker.dynmem import DynamicMemoryError
        from pyhv.worker.messages import MemoryCall

        # What the worker would refuse (it answers only what decodes) is refused here.
        if call == "limits":
            if not (
                isinstance(value, tuple | list)
                and len(value) == 2
                and all(type(v) is int for v in value)
            ):
                raise DynamicMemoryError(
                    f"memory 'limits' needs [minimum, maximum] in bytes, got {value!r}"
                )
            value = (value[0], value[1])
        elif call == "hot_remove" and value is None:
            pass  # every hot-added page
        elif call not in ("status", "end_smart_paging") and type(value) is not int:
            raise DynamicMemoryError(f"memory {call!r} needs an integer value, got {value!r}")
        event, box = threading.Event(), list[Any]()
        with self._send_lock:
            self._call_id += 1
            call_id = self._call_id
        self._calls[call_id] = (event, box)
        self._send(MemoryCall(call_id, call, value))  # type: ignore[arg-type]
        if not event.wait(timeout) or not box:
            self._calls.pop(call_id, None)
            raise DynamicMemoryError(
                f"memory {call}: the worker did not answer"
                + (" (the VM has ended)" if self._ended.is_set() else f" in {timeout} s")
            )
        reply = box[0]
        if reply.error is not None:
            raise DynamicMemoryError(reply.error)
        return reply.result

    def memory_status(self) -> dict[str, Any]:
        """As VirtualMachine.memory_status (the operator's view), asked of the worker process.
        The VMMS does not ask: it reads what the worker pushed (subscribe_memory_status)."""
        return self._memory("status")  # type: ignore[no-any-return]

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        return self._memory("target", target_bytes)  # type: ignore[no-any-return]

    def set_memory_limits(self, minimum: int, maximum: int) -> dict[str, Any]:
        """As VirtualMachine.set_memory_limits, in the worker process."""
        return self._memory("limits", (minimum, maximum))  # type: ignore[no-any-return]

    def end_smart_paging(self, timeout: float = 60.0) -> dict[str, Any]:
        """As VirtualMachine.end_smart_paging, in the worker process."""
        return self._memory("end_smart_paging", None, timeout)  # type: ignore[no-any-return]

    def add_memory(self, pages: int) -> dict[str, Any]:
        return self._memory("add", pages)  # type: ignore[no-any-return]

    def remove_memory(self, pages: int) -> dict[str, Any]:
        return self._memory("remove", pages)  # type: ignore[no-any-return]

    def hot_remove_memory(self, pages: int | None = None) -> dict[str, Any]:
        """As VirtualMachine.hot_remove_memory, in the worker process."""
        return self._memory("hot_remove", pages)  # type: ignore[no-any-return]

    def _send(self, msg: Any) -> None:
        """Send one declared message (pyhv.worker.messages) to the worker."""
        if self._sock is None or self._ended.is_set():
            return
        with self._send_lock:
            try:
                protocol.send_message(self._sock, msg)
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
