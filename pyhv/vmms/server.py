"""Serving the API: on a Unix socket (default ``<state>/vmms.sock``, mode 0600: its file
permissions admit only its owner) and, optionally, on TCP at 127.0.0.1 with a bearer token.
Standard-library servers, one thread per connection."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import secrets
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any

from pyhv.vmms.api import ApiHandler
from pyhv.vmms.service import Vmms
from pyhv.vmms.store import write_atomically


class ServeError(RuntimeError):
    """The API cannot be served as asked; the message says why and what to do."""


class UnixApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, vmms: Vmms) -> None:
        self.vmms = vmms
        self.token: str | None = None
        self.path = Path(path)
        _remove_stale_socket(self.path)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            super().__init__(str(self.path), ApiHandler)
        finally:
            os.umask(old)

    def get_request(self) -> tuple[Any, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)  # http.server logs client_address[0]

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class TcpApiServer(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, host: str, port: int, vmms: Vmms, token: str) -> None:
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ServeError(
                f"TCP address {host!r} is not a loopback address: the VMMS serves TCP on "
                "127.0.0.1 only (use the Unix socket, or an SSH tunnel, from elsewhere)"
            )
        self.vmms = vmms
        self.token = token
        super().__init__((host, port), ApiHandler)


def _remove_stale_socket(path: Path) -> None:
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)  # left by a VMMS that is gone
        return
    finally:
        probe.close()
    raise ServeError(f"another VMMS already serves on {path}: stop it, or use --state-dir")


def load_or_make_token(state_dir: Path) -> str:
    """The TCP bearer token: ``<state>/token`` (0600), made on first use."""
    path = Path(state_dir) / "token"
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    write_atomically(path, token + "\n", 0o600)
    return token


class ApiServers:
    """The Unix server and optional TCP server, each serving on a thread of its own."""

    def __init__(self, vmms: Vmms, socket_path: Path, tcp: tuple[str, int] | None = None) -> None:
        self.unix = UnixApiServer(socket_path, vmms)
        self.tcp: TcpApiServer | None = None
        if tcp is not None:
            try:
                self.tcp = TcpApiServer(
                    tcp[0], tcp[1], vmms, load_or_make_token(vmms.store.state_dir)
                )
            except BaseException:
                self.unix.server_close()
                raise
        self._threads: list[threading.Thread] = []

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        return self.tcp.server_address[:2] if self.tcp else None  # type: ignore[return-value]

    def start(self) -> None:
        for srv in (self.unix, self.tcp):
            if srv is not None:
                t = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
                t.start()
                self._threads.append(t)

    def close(self) -> None:
        for srv in (self.unix, self.tcp):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
