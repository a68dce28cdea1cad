"""The operator's control endpoint of a running VM (like QEMU's monitor `balloon`/`info balloon`):
a Unix socket speaking the worker protocol's framing (u32 length + JSON).

Requests: ``{"op": "status"}`` and ``{"op": "target", "bytes": n}``. Replies:
``{"ok": true, "status": {...}}`` (plus ``"plan"`` for a target) or ``{"ok": false, "error": text}``.
`pyhv run --control PATH` serves it; `pyhv memory --control PATH [--target SIZE]` is the client.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
from typing import Any

from pyhv.worker import protocol

log = logging.getLogger("pyhv.worker.control")


class ControlError(RuntimeError):
    """The control endpoint cannot be served or reached; the message says why."""


class ControlServer:
    """Serves `vm` (anything with memory_status() and set_memory_target(bytes)) at `path`."""

    def __init__(self, path: str, vm: Any) -> None:
        self.path = path
        self.vm = vm
        self._sock = _listen(path)
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while (msg := protocol.recv(conn)) is not None:
                    protocol.send(conn, self.handle(msg))
            except (OSError, ValueError) as e:
                log.info("control connection dropped: %s", e)

    def handle(self, msg: dict[str, object]) -> dict[str, object]:
        from pyhv.worker.dynmem import DynamicMemoryError

        op = msg.get("op")
        try:
            if op == "status":
                return {"ok": True, "status": self.vm.memory_status()}
            if op == "target":
                value = msg.get("bytes")
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    return {"ok": False, "error": f"target must be a byte count, got {value!r}"}
                plan = self.vm.set_memory_target(value)
                return {"ok": True, "plan": plan, "status": self.vm.memory_status()}
        except DynamicMemoryError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": False, "error": f"unknown request {op!r}: use status or target"}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def _listen(path: str) -> socket.socket:
    if len(os.fsencode(path)) > 107:
        raise ControlError(f"control socket path {path!r} is too long for a Unix socket (max 107)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket: choose another --control path")
        try:
            request(path, {"op": "status"}, timeout=1)
        except ControlError:
            os.unlink(path)  # left over from a VM that is gone
        else:
            raise ControlError(f"{path} is served by another running VM: choose another path")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(4)
    except OSError as e:
        sock.close()
        raise ControlError(f"cannot serve the control socket at {path}: {e.strerror}") from None
    return sock


def request(path: str, msg: dict[str, object], timeout: float = 30.0) -> dict[str, object]:
    """One request to a VM's control endpoint; ControlError if it cannot be reached."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            protocol.send(s, msg)
            reply = protocol.recv(s)
        except FileNotFoundError:
            raise ControlError(
                f"no control socket at {path}: start the VM with `pyhv run --control {path}`"
            ) from None
        except (OSError, ValueError) as e:
            raise ControlError(f"cannot talk to the VM at {path}: {e}") from None
    if reply is None:
        raise ControlError(f"the VM at {path} closed the connection without an answer")
    return reply
