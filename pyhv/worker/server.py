"""The worker process's side of the protocol: build the VM from the owner's configuration,
stream serial output, accept input and stop requests, report how the VM ended, exit.
If the owner goes away, the VM is stopped: a worker never outlives its owner's interest."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from pyhv.worker import protocol
from pyhv.worker.config import ConfigError, VmConfig
from pyhv.worker.outcome import WORKER_ERROR, VmEnd


class _SerialBatcher:
    """Collects serial output written byte by byte on VP threads and sends it in batches from
    a thread of its own, so the guest never waits for the socket."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="serial-batcher", daemon=True)
        self._thread.start()

    def add(self, data: bytes) -> None:
        with self._cond:
            self._buf += data
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


def serve(sock: socket.socket) -> int:
    from pyhv.worker.vm import VirtualMachine

    lock = threading.Lock()

    def send(msg: dict[str, object]) -> None:
        with lock:
            try:
                protocol.send(sock, msg)
            except OSError:
                pass  # owner gone: the command loop sees EOF and stops the VM

    first = protocol.recv(sock)
    if first is None:
        return 0
    incoming = None
    if first.get("op") == "incoming":  # live migration's destination (pyhv.migration.worker)
        from pyhv.migration.worker import accept_incoming

        incoming, first = accept_incoming(first, send)
        if incoming is None:
            return 1
    if first.get("op") != "boot" or not isinstance(first.get("config"), dict):
        send(
            {
                "ev": "ended",
                "end": VmEnd(WORKER_ERROR, detail="first message must be 'boot'").to_dict(),
            }
        )
        return 2
    try:
        config = VmConfig.from_dict(first["config"])  # type: ignore[arg-type]
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        send(
            {"ev": "ended", "end": VmEnd(WORKER_ERROR, detail=f"bad configuration: {e}").to_dict()}
        )
        return 2

    out = _SerialBatcher(lambda b: send({"ev": "serial", "data": protocol.encode_bytes(b)}))
    vm = VirtualMachine(
        config,
        output=out.add,
        on_memory_status=lambda st: send({"ev": "memory_status", "status": st.to_wire()}),
    )

    def commands() -> None:
        try:
            while True:
                msg = protocol.recv(sock)
                if msg is None:
                    break
                op = msg.get("op")
                if op == "serial":
                    vm.send(protocol.decode_bytes(msg.get("data")))
                elif op == "stop":
                    vm.stop(str(msg.get("why") or "stopped by its owner")[:200])
                elif op == "memory":
                    send(memory_call(vm, msg))
                elif op == "migrate":
                    from pyhv.migration.worker import start_migration

                    start_migration(vm, msg, send)
        except (OSError, ValueError):
            pass
        vm.stop("the owner closed the worker's socket")

    try:
        vm.start(incoming=None if incoming is None else incoming.receive)
    except Exception as e:  # noqa: BLE001 - reported to the owner, who decides
        send(
            {
                "ev": "ended",
                "end": VmEnd(WORKER_ERROR, detail=f"could not start the VM: {e}").to_dict(),
            }
        )
        return 1
    if incoming is not None:
        incoming.resumed(send)
    send({"ev": "started", "pid": os.getpid()})
    threading.Thread(target=commands, name="worker-commands", daemon=True).start()
    end = vm.wait()
    assert end is not None
    vm.close()
    out.close()  # all serial output goes before the end report
    send({"ev": "ended", "end": end.to_dict()})
    return 0


def memory_call(vm: Any, msg: dict[str, object]) -> dict[str, object]:
    """Carry out one Dynamic Memory request of the owner; the reply carries the result or
    the reason it was refused (never an exception across the socket)."""
    from pyhv.worker.dynmem import DynamicMemoryError

    reply: dict[str, object] = {"ev": "memory", "id": msg.get("id")}
    call, value = msg.get("call"), msg.get("value")
    try:
        if call == "status":
            reply["result"] = vm.memory_status()
            return reply
        if call == "limits":
            if not (isinstance(value, list) and len(value) == 2):
                raise DynamicMemoryError(
                    f"memory 'limits' needs [minimum, maximum] in bytes, got {value!r}"
                )
            reply["result"] = vm.set_memory_limits(value[0], value[1])
            return reply
        if isinstance(value, bool) or not isinstance(value, int):
            raise DynamicMemoryError(f"memory {call!r} needs an integer value, got {value!r}")
        if call == "target":
            reply["result"] = vm.set_memory_target(value)
        elif call == "add":
            reply["result"] = vm.add_memory(value)
        elif call == "remove":
            reply["result"] = vm.remove_memory(value)
        else:
            raise DynamicMemoryError(
                f"unknown memory call {call!r}: use status, target, limits, add or remove"
            )
    except (DynamicMemoryError, ValueError) as e:
        reply["error"] = str(e)
    return reply


def main(argv: list[str]) -> int:
    # Internal options, read without argparse (whose import and help formatter, shutil,
    # bz2, lzma, gettext, are a few ms of every VM's start). --confine: the worker is jailed
    # (pyhv.worker.jail) and confines itself before it serves (pyhv.worker.confine); BYTES
    # is the VM's largest memory (its memfds' size, which RLIMIT_FSIZE must allow).
    confine_bytes = None
    if len(argv) == 3 and argv[2].startswith("--confine="):
        confine_bytes, argv = argv[2].removeprefix("--confine="), argv[:2]
    if (
        len(argv) != 2
        or argv[0] != "--fd"
        or not (argv[1].isascii() and argv[1].isdigit())
        or not (confine_bytes is None or (confine_bytes.isascii() and confine_bytes.isdigit()))
    ):
        print(
            f"usage: python -m pyhv.worker --fd N [--confine=BYTES] (got {' '.join(argv)!r}): N "
            "is a connected stream socket to the worker's owner; pyhv starts workers, not people",
            file=sys.stderr,
        )
        return 2
    sock = socket.socket(fileno=int(argv[1]))
    try:
        if confine_bytes is not None:
            _confine(sock, int(confine_bytes))
        return serve(sock)
    finally:
        sock.close()


def _confine(sock: socket.socket, max_file_bytes: int) -> None:
    """Limits, not dumpable, seccomp: before the first message is read. The VM's modules are
    imported first (the filter would allow it, but the import is no guest's doing)."""
    import pyhv.worker.vm  # noqa: F401
    from pyhv.worker.confine import ConfineError, confine

    try:
        confine(max_file_bytes)
    except (ConfineError, OSError, ValueError) as e:
        end = VmEnd(WORKER_ERROR, detail=f"the worker could not confine itself: {e}")
        protocol.send(sock, {"ev": "ended", "end": end.to_dict()})
        raise SystemExit(1) from None
