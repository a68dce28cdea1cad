"""The worker process's side of the protocol: build the VM from the owner's configuration,
stream serial output, accept input and stop requests, report how the VM ended, exit.
If the owner goes away, the VM is stopped, unless the owner gave the worker a way to be adopted
(a listening socket and a secret, pyhv.worker.adoption: the VMMS does): then the VM runs on and
a new owner may take the worker over."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyhv.worker import protocol
from pyhv.worker.config import ConfigError, VmConfig
from pyhv.worker.outcome import WORKER_ERROR, VmEnd

if TYPE_CHECKING:
    from pyhv.worker.messages import MemoryCall, MemoryReply


#: Serial output waiting for the owner, at most (bytes): past it the oldest is dropped.
SERIAL_BACKLOG = 1 << 20


class _SerialBatcher:
    """Collects serial output written byte by byte on VP threads and sends it in batches from
    a thread of its own, so the guest never waits for the socket. The backlog is bounded (an
    owner that does not read never makes a guest's output pin the worker's memory): past
    `limit` bytes the oldest go, counted in `dropped`."""

    def __init__(self, send: Callable[[bytes], None], limit: int = SERIAL_BACKLOG) -> None:
        self._send = send
        self._limit = limit
        self.dropped = 0
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="serial-batcher", daemon=True)
        self._thread.start()

    def add(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
            excess = len(self._buf) - self._limit
            if excess > 0:
                del self._buf[:excess]
                self.dropped += excess
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._buf) or self._closed)
                data = bytes(self._buf[: 256 << 10])
                del self._buf[: len(data)]
                if not data and self._closed:
                    return
            if data:
                self._send(data)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(10)


def serve(
    sock: socket.socket,
    listener: socket.socket | None = None,
    confined: bool = False,
    huge_ram_fd: int | None = None,
) -> int:
    """Serve the owner on `sock`; with `listener` (and a secret in the first message), the VM
    outlives its owner and a new one may adopt the worker (pyhv.worker.adoption). With
    `huge_ram_fd`, `huge_pages` RAM goes on that tmpfs (its owner mounted it)."""
    # The declared messages (and msgspec) only where they cross: not on `pyhv run`'s boot path.
    from pyhv.worker import messages as m
    from pyhv.worker.adoption import END_LINGER_S, Owner
    from pyhv.worker.vm import VirtualMachine

    def first_send(msg: m._Event) -> None:
        try:
            protocol.send_message(sock, msg)
        except OSError:
            pass  # owner gone

    def ended(detail: str) -> None:
        send(m.Ended(m.EndReport.of(VmEnd(WORKER_ERROR, detail=detail))))

    send: Callable[[m._Event], None] = first_send
    raw = protocol.recv_frame(sock)
    if raw is None:
        return 0
    try:
        first = m.decode_op(raw)
        if not isinstance(first, m.Boot | m.Incoming):
            raise m.MessageError(
                f"the first message must be 'boot' or 'incoming', got {type(first).__name__}"
            )
        m.check_version(first.protocol, "the owner")
    except m.MessageError as e:
        ended(str(e))
        return 2
    owner = Owner(sock, listener, first.adoption_secret)
    send = owner.send
    incoming = None
    queued: list[m.Op] = []
    if isinstance(first, m.Incoming):  # live migration's destination (pyhv.migration.worker)
        from pyhv.migration.worker import OwnerGuard, accept_incoming

        guard = None
        if first.confirm:  # the owner's Resume, or its going away, decides (read meanwhile)
            guard = OwnerGuard()
            threading.Thread(
                target=_guard_incoming, args=(sock, guard, queued), name="owner-guard", daemon=True
            ).start()
        incoming, boot = accept_incoming(first, send, guard)
        if incoming is None:
            owner.close()
            return 1
    else:
        boot = first
    try:
        config = VmConfig.from_dict(boot.config)
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        ended(f"bad configuration: {e}")
        owner.close()
        return 2
    huge_ram = None
    if config.huge_pages and huge_ram_fd is not None:
        from pyhv.memory.hugeram import HugeRam, HugeRamError

        try:
            huge_ram = HugeRam.from_fd(huge_ram_fd)
        except (HugeRamError, OSError) as e:
            ended(f"bad configuration: huge_pages: {e}")
            owner.close()
            return 2
    elif confined and config.huge_pages:  # its seccomp list would kill it at fsopen
        ended(
            "bad configuration: huge_pages needs a private tmpfs mount, which a jailed worker "
            "cannot make (no capabilities, no mount calls): its owner passes one, or run the VM "
            "with 4 KiB pages"
        )
        owner.close()
        return 2

    out = _SerialBatcher(owner.serial)
    vm = VirtualMachine(
        config, output=out.add, on_memory_status=owner.memory_status, huge_ram=huge_ram
    )

    # --- flight recorder (trace messages; see pyhv.worker.trace) ---
    from pyhv.worker.trace import TraceStream, kinds_from_wire

    tracing = TraceStream(vm, send)

    # --- end flight recorder ---
    if isinstance(boot, m.Boot) and boot.smart_paging is not None:  # pyhv.worker.smartpaging
        from pyhv.memory.smartpaging import SmartPagingFile

        vm.smart_paging = SmartPagingFile(boot.smart_paging.fd, boot.smart_paging.size)

    def migrate(msg: m.Migrate | m.MigrationDecision) -> None:
        from pyhv.migration.worker import start_migration

        start_migration(vm, msg, send)

    # One handler per declared op; an op without one (boot or incoming again) is refused.
    handlers: dict[type, Callable[[Any], object]] = {
        m.SerialIn: lambda msg: vm.send(msg.data),
        m.Stop: lambda msg: vm.stop(msg.why[:200]),
        m.MemoryCall: lambda msg: send(memory_call(vm, msg)),
        m.Migrate: migrate,
        m.MigrationDecision: migrate,
        m.Trace: lambda msg: tracing.set(msg.on, kinds_from_wire(msg.kinds)),
    }

    def commands(conn: socket.socket, earlier: list[m.Op]) -> None:
        refused = 0
        for msg in earlier:  # what the owner sent while the VM arrived
            handler = handlers.get(type(msg))
            if handler is not None:
                handler(msg)
        try:
            while True:
                try:
                    raw = protocol.recv_frame(conn)
                    if raw is None:
                        break
                    msg = m.decode_op(raw)
                    handler = handlers.get(type(msg))
                    if handler is None:
                        raise m.MessageError(f"'{msg.__struct_config__.tag}' is not taken now")
                except (protocol.FrameRefused, m.MessageError) as e:
                    # Refused, told, counted; the VM runs on.
                    refused += 1
                    print(f"pyhv worker: refused message {refused}: {e}", file=sys.stderr)
                    send(m.Refused(str(e)[:65536]))
                    continue
                handler(msg)
        except (OSError, ValueError):
            pass
        tracing.set(False)
        if owner.lost(conn):
            print("pyhv worker: the owner went away; the VM runs on", file=sys.stderr)
        else:
            vm.stop("the owner closed the worker's socket")

    def serve_owner(conn: socket.socket, earlier: list[m.Op]) -> None:
        threading.Thread(
            target=commands, args=(conn, earlier), name="worker-commands", daemon=True
        ).start()

    final: list[VmEnd] = []

    def describe(serial: bytes, counters: dict[str, int], memory: Any) -> m.Adopted:
        """What a new owner is told (under the owner's lock, pyhv.worker.adoption)."""
        migration, paused = None, False
        if "pyhv.migration.worker" in sys.modules:
            from pyhv.migration.worker import in_flight

            migration, paused = in_flight()
        end = final[0] if final else vm.end
        return m.Adopted(
            m.PROTOCOL_VERSION,
            os.getpid(),
            boot.config,
            "ended" if end is not None else "paused" if paused else "running",
            end=None if end is None else m.EndReport.of(end),
            memory=memory,
            serial=serial,
            migration=migration,
            counters=counters,
        )

    try:
        vm.start(incoming=None if incoming is None else incoming.receive, early=incoming)
    except Exception as e:  # noqa: BLE001 - reported to the owner, who decides
        ended(f"could not start the VM: {e}")
        owner.close()
        return 1
    if incoming is not None:
        incoming.resumed(send)
    send(m.Started(os.getpid(), m.PROTOCOL_VERSION))
    serve_owner(sock, queued)
    owner.serve_adoptions(describe, lambda conn: serve_owner(conn, []))
    end = vm.wait()
    assert end is not None
    vm.close()
    tracing.close()  # all recorded events and serial output go before the end report
    out.close()
    final.append(end)
    if owner.adoptable and not owner.wait_owner(0):
        # Nobody to tell: wait (bounded) for a new owner, whose Adopted carries the end.
        print("pyhv worker: the VM ended unowned; waiting for an owner", file=sys.stderr)
        owner.wait_owner(END_LINGER_S)
    send(m.Ended(m.EndReport.of(end)))
    owner.close()
    return 0


def _guard_incoming(sock: socket.socket, guard: Any, queued: list[Any]) -> None:
    """A destination worker's owner socket until the owner says Resume: its EOF or Stop aborts
    the arrival (no RESUMED goes to the source); anything else waits for the VM to run."""
    from pyhv.worker import messages as m

    try:
        while True:
            try:
                raw = protocol.recv_frame(sock)
                if raw is None:
                    break
                msg = m.decode_op(raw)
            except (protocol.FrameRefused, m.MessageError):
                continue
            if isinstance(msg, m.Resume):
                guard.resume()
                return
            if isinstance(msg, m.Stop):
                guard.abort(f"its owner stopped it: {msg.why[:200]}")
                return
            queued.append(msg)
    except (OSError, ValueError):
        pass
    guard.abort("its owner (the destination VMMS) went away before it confirmed the VM")


def memory_call(vm: Any, msg: MemoryCall) -> MemoryReply:
    """Carry out one Dynamic Memory request of the owner; the reply carries the result or
    the reason it was refused (never an exception across the socket)."""
    from pyhv.worker.dynmem import DynamicMemoryError
    from pyhv.worker.messages import MemoryReply

    call, value = msg.call, msg.value
    try:
        if call == "status":
            result = vm.memory_status()
        elif call == "end_smart_paging":
            result = vm.end_smart_paging()
        elif call == "hot_remove" and not isinstance(value, tuple):
            result = vm.hot_remove_memory(value)
        elif call == "limits":
            if not isinstance(value, tuple):
                raise DynamicMemoryError(
                    f"memory 'limits' needs [minimum, maximum] in bytes, got {value!r}"
                )
            result = vm.set_memory_limits(value[0], value[1])
        elif not isinstance(value, int):
            raise DynamicMemoryError(f"memory {call!r} needs an integer value, got {value!r}")
        elif call == "target":
            result = vm.set_memory_target(value)
        elif call == "add":
            result = vm.add_memory(value)
        else:
            result = vm.remove_memory(value)
    except (DynamicMemoryError, ValueError) as e:
        return MemoryReply(msg.id, error=str(e)[:65536])
    return MemoryReply(msg.id, result=result)


def main(argv: list[str]) -> int:
    # Internal options, read without argparse (whose import and help formatter, shutil,
    # bz2, lzma, gettext, are a few ms of every VM's start). --confine: the worker is jailed
    # (pyhv.worker.jail) and confines itself before it serves (pyhv.worker.confine); BYTES
    # is the VM's largest memory (its memfds' size, which RLIMIT_FSIZE must allow).
    # --adopt-fd: a listening Unix socket new owners connect to (pyhv.worker.adoption).
    # --huge-ram-fd: the private tmpfs its owner mounted for huge_pages RAM (pyhv.memory.hugeram).
    options: dict[str, str | None] = {"--confine": None, "--adopt-fd": None, "--huge-ram-fd": None}
    while len(argv) > 2 and argv[-1].partition("=")[0] in options:
        key, _, value = argv[-1].partition("=")
        options[key], argv = value, argv[:-1]
    confine_bytes, adopt_fd = options["--confine"], options["--adopt-fd"]
    if (
        len(argv) != 2
        or argv[0] != "--fd"
        or not (argv[1].isascii() and argv[1].isdigit())
        or not all(v is None or (v.isascii() and v.isdigit()) for v in options.values())
    ):
        print(
            f"usage: python -m pyhv.worker --fd N [--confine=BYTES] [--adopt-fd=M] "
            f"[--huge-ram-fd=K] (got "
            f"{' '.join(argv)!r}): N is a connected stream socket to the worker's owner; pyhv "
            "starts workers, not people",
            file=sys.stderr,
        )
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    listener = None
    try:
        if adopt_fd is not None:
            from pyhv.worker.adoption import listener_from_fd

            try:
                listener = listener_from_fd(int(adopt_fd))
            except (OSError, ValueError) as e:
                print(f"pyhv worker: --adopt-fd={adopt_fd}: {e}", file=sys.stderr)
                return 2
        if confine_bytes is not None:
            _confine(sock, int(confine_bytes))
        huge = options["--huge-ram-fd"]
        return serve(
            sock,
            listener,
            confined=confine_bytes is not None,
            huge_ram_fd=None if huge is None else int(huge),
        )
    finally:
        sock.close()
        if listener is not None:
            listener.close()


def _confine(sock: socket.socket, max_file_bytes: int) -> None:
    """Limits, not dumpable, seccomp: before the first message is read. The VM's modules are
    imported first (the filter would allow it, but the import is no guest's doing)."""
    import pyhv.worker.vm  # noqa: F401
    from pyhv.worker.confine import ConfineError, confine

    try:
        confine(max_file_bytes)
    except (ConfineError, OSError, ValueError) as e:
        from pyhv.worker import messages as m

        end = VmEnd(WORKER_ERROR, detail=f"the worker could not confine itself: {e}")
        protocol.send_message(sock, m.Ended(m.EndReport.of(end)))
        raise SystemExit(1) from None
