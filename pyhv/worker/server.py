"""The worker process's side of the protocol: build the VM from the owner's configuration,
stream serial output, accept input and stop requests, report how the VM ended, exit.
If the owner goes away, the VM is stopped: a worker never outlives its owner's interest."""

from __future__ import annotations

import argparse
import os
import socket
import threading

from pyhv.worker import protocol
from pyhv.worker.config import ConfigError, VmConfig
from pyhv.worker.outcome import WORKER_ERROR, VmEnd


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

    vm = VirtualMachine(
        config, output=lambda b: send({"ev": "serial", "data": protocol.encode_bytes(b)})
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
                    vm.stop("stopped by its owner")
        except (OSError, ValueError):
            pass
        vm.stop("the owner closed the worker's socket")

    try:
        vm.start()
    except Exception as e:  # noqa: BLE001 - reported to the owner, who decides
        send(
            {
                "ev": "ended",
                "end": VmEnd(WORKER_ERROR, detail=f"could not start the VM: {e}").to_dict(),
            }
        )
        return 1
    send({"ev": "started", "pid": os.getpid()})
    threading.Thread(target=commands, name="worker-commands", daemon=True).start()
    end = vm.wait()
    assert end is not None
    vm.close()
    send({"ev": "ended", "end": end.to_dict()})
    return 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m pyhv.worker", description=__doc__)
    ap.add_argument("--fd", type=int, required=True, help="connected stream socket to the owner")
    args = ap.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    try:
        return serve(sock)
    finally:
        sock.close()
