"""The operator's control endpoint of a running VM (like QEMU's monitor `balloon`/`info balloon`):
a Unix socket speaking the worker protocol's framing (u32 length + JSON).

Requests: ``{"op": "status"}``, ``{"op": "target", "bytes": n}`` and ``{"op": "hot_remove",
"bytes": n}`` (``bytes`` left out: all hot-added memory). Replies: ``{"ok": true, "status":
{...}}`` (plus ``"plan"`` for a target or a hot-remove) or ``{"ok": false, "error": text}``.
Declared in pyhv.worker.messages (ControlRequest, ControlReply); a request that does not decode
is answered with ``ok`` false and the reason, and the endpoint serves on. msgspec is imported
when the first request arrives, not when `pyhv run` starts the endpoint.
`pyhv run --control PATH` serves it; `pyhv memory --control PATH [--target SIZE | --hot-remove
[SIZE]]` is the client.
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
                while True:
                    try:
                        raw = protocol.recv_frame(conn)
                    except protocol.FrameRefused as e:
                        protocol.send_message(conn, _refused(str(e)))
                        continue
                    if raw is None:
                        break
                    protocol.send_message(conn, self.handle(raw))
            except (OSError, ValueError) as e:
                log.info("control connection dropped: %s", e)

    def handle(self, raw: bytes) -> Any:
        """One request's reply (a ControlReply)."""
        from pyhv.worker import messages as m
        from pyhv.worker.dynmem import DynamicMemoryError

        try:
            msg = m.decode_control(raw)
            if isinstance(msg, m.ControlStatus):
                return m.ControlReply(True, status=self.vm.memory_status())
            if isinstance(msg, m.ControlHotRemove):
                pages = None if msg.bytes is None else msg.bytes // 4096
                plan = self.vm.hot_remove_memory(pages)
                return m.ControlReply(True, status=self.vm.memory_status(), plan=plan)
            plan = self.vm.set_memory_target(msg.bytes)
            return m.ControlReply(True, status=self.vm.memory_status(), plan=plan)
        except (m.MessageError, DynamicMemoryError) as e:
            return m.ControlReply(False, error=str(e)[:65536])

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
            from pyhv.worker.messages import ControlStatus

            request(path, ControlStatus(), timeout=1)
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


def _refused(why: str) -> Any:
    from pyhv.worker.messages import ControlReply

    return ControlReply(False, error=why)


def request(path: str, msg: Any, timeout: float = 30.0) -> dict[str, object]:
    """One request (a ControlRequest of pyhv.worker.messages) to a VM's control endpoint; the
    reply as a dict (ok, status, plan, error). ControlError if it cannot be reached or its
    answer does not decode."""
    import msgspec

    from pyhv.worker.messages import MessageError, decode_control_reply

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
            protocol.send_message(s, msg)
            raw = protocol.recv_frame(s)
            reply = None if raw is None else decode_control_reply(raw)
        except FileNotFoundError:
            raise ControlError(
                f"no control socket at {path}: start the VM with `pyhv run --control {path}`"
            ) from None
        except (OSError, MessageError, protocol.ProtocolError) as e:
            raise ControlError(f"cannot talk to the VM at {path}: {e}") from None
    if reply is None:
        raise ControlError(f"the VM at {path} closed the connection without an answer")
    return msgspec.structs.asdict(reply)
