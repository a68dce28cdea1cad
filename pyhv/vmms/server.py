"""Serving the API with uvicorn (h11) on one event loop thread: on a Unix socket (default
``<state>/vmms.sock``, mode 0600: its file permissions admit only its owner) and, optionally,
on TCP with bearer tokens (pyhv.vmms.auth) and, for any address beyond loopback, TLS with
client certificates.

Each server caps its open connections and gives each request's head and body a deadline
(pyhv.vmms.httpconn, pyhv.vmms.api); the service is called on a bounded thread pool, so
neither idle nor slow clients cost a thread (issue 11, finding 6)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import socket
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from pyhv.counters.registry import CounterSet
from pyhv.vmms.api import ApiState, make_app
from pyhv.vmms.auth import (
    ADMIN,
    CLUSTER,
    MIGRATE,
    Authenticator,
    load_or_make_token,
    read_token,
    token_path,
)
from pyhv.vmms.httpconn import API_SET, connection_class
from pyhv.vmms.service import Vmms

log = logging.getLogger(__name__)


class ServeError(RuntimeError):
    """The API cannot be served as asked; the message says why and what to do."""


@dataclass(frozen=True)
class ServerTls:
    """The TCP API's certificate and key, and the CA whose client certificates it accepts
    (None: no client certificate is asked for; the bearer token alone admits)."""

    cert: Path
    key: Path
    client_ca: Path | None = None


@dataclass(frozen=True)
class Limits:
    """Per server: open connections at most, seconds for a request's head and for its body,
    seconds an idle keep-alive connection stays, bytes of one incomplete HTTP event (a
    request head)."""

    max_connections: int = 1024
    head_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive: float = 5.0
    max_head_bytes: int = 16 << 10


def raise_open_files_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (each API connection is a
    file descriptor); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class UnixListener:
    """The Unix socket, created 0600 (a stale one left by a VMMS that is gone is replaced)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            sock.bind(str(self.path))
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old)
        sock.listen(1024)
        self.sock = sock

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


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


def _tcp_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(1024)
    return sock


def _config(
    app: object,
    limits: Limits,
    tls: ServerTls | None,
    verbose: bool,
    counters: CounterSet,
    instance: str,
) -> uvicorn.Config:
    kw: dict[str, object] = {}
    if tls is not None:
        kw = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            kw |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        http=connection_class(limits.max_connections, limits.head_timeout, counters, instance),
        ws="none",
        lifespan="off",
        interface="asgi3",
        log_config=None,
        access_log=verbose,
        proxy_headers=False,
        server_header=False,
        # uvicorn's own cap (it answers 503 past it): above ours, which closes the connection
        limit_concurrency=limits.max_connections + 1,
        timeout_keep_alive=int(max(1, limits.keep_alive)),
        timeout_graceful_shutdown=2,
        h11_max_incomplete_event_size=limits.max_head_bytes,
        **kw,  # type: ignore[arg-type]
    )
    try:
        config.load()  # here, not on the loop thread: a bad certificate is said at once
    except (OSError, ssl.SSLError) as e:
        raise ServeError(f"cannot use the TLS certificate, key or client CA: {e}") from None
    if config.ssl is not None:
        config.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
    return config


class ApiServers:
    """The Unix server and the optional TCP server, on one event loop thread of their own."""

    def __init__(
        self,
        vmms: Vmms,
        socket_path: Path,
        tcp: tuple[str, int] | None = None,
        *,
        tls: ServerTls | None = None,
        migration_token_file: Path | None = None,
        limits: Limits | None = None,
        verbose: bool = False,
    ) -> None:
        limits = self._limits = limits or Limits()
        if tcp is not None and tls is None and not is_loopback(tcp[0]):
            raise ServeError(
                f"TCP address {tcp[0]!r} is not a loopback address: beyond loopback the VMMS "
                "serves only with TLS (give --tls-cert, --tls-key and --tls-client-ca), or use "
                "127.0.0.1 (and an SSH tunnel from elsewhere)"
            )
        if tls is not None and tcp is None:
            raise ServeError("TLS is for the TCP API: give --tcp HOST:PORT with it")
        state_dir = vmms.store.state_dir
        auth: Authenticator | None = None
        tcp_url: str | None = None
        self._tcp_sock: socket.socket | None = None
        if tcp is not None:
            try:
                admin = load_or_make_token(token_path(state_dir, ADMIN))
                if migration_token_file is not None:
                    migrate = read_token(migration_token_file, "the migration token")
                else:
                    migrate = load_or_make_token(token_path(state_dir, MIGRATE))
                # The cluster's peers place VMs here with this one (pyhv.cluster.provision).
                cluster = load_or_make_token(token_path(state_dir, CLUSTER))
                auth = Authenticator(admin, migrate, cluster)
            except Exception as e:
                raise ServeError(str(e)) from None
            self._tcp_sock = _tcp_socket(*tcp)
        self.unix = UnixListener(socket_path)
        self.vmms = vmms
        self.tls = tls
        try:
            if self._tcp_sock is not None:
                host, port = self._tcp_sock.getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                tcp_url = f"{'https' if tls else 'http'}://{shown}:{port}"
            self.tcp_url = tcp_url
            counters = vmms.registry.register(API_SET)
            unix_state = ApiState(
                vmms,
                auth,
                trusted=True,
                tcp_url=tcp_url,
                body_timeout=limits.body_timeout,
                counters=counters,
                instance="unix",
            )
            # one thread pool for both servers: the service sees at most SERVICE_THREADS calls
            tcp_state = ApiState(
                vmms,
                auth,
                trusted=False,
                tcp_url=tcp_url,
                body_timeout=limits.body_timeout,
                counters=counters,
                instance="tcp",
            )
            tcp_state.limiter = unix_state.limiter
            self._configs: list[tuple[uvicorn.Config, socket.socket]] = [
                (
                    _config(make_app(unix_state), limits, None, verbose, counters, "unix"),
                    self.unix.sock,
                )
            ]
            if self._tcp_sock is not None:
                cfg = _config(make_app(tcp_state), limits, tls, verbose, counters, "tcp")
                self._configs.append((cfg, self._tcp_sock))
        except BaseException:
            self.unix.close()
            if self._tcp_sock is not None:
                self._tcp_sock.close()
            raise
        self._servers: list[uvicorn.Server] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def tcp_address(self) -> tuple[str, int] | None:
        if self._tcp_sock is None:
            return None
        host, port = self._tcp_sock.getsockname()[:2]
        return host, port

    def start(self) -> None:
        started = threading.Event()
        self._servers = [uvicorn.Server(cfg) for cfg, _ in self._configs]

        async def main() -> None:
            self._loop = loop = asyncio.get_running_loop()
            # uvicorn passes no handshake deadline (asyncio's default is 60 s): a TLS client
            # gets the request head's, since it is not a connection of ours until then.
            create_server = loop.create_server
            handshake = self._limits.head_timeout

            async def create_server_with_deadline(*args: Any, **kw: Any) -> Any:
                if kw.get("ssl") is not None:
                    kw.setdefault("ssl_handshake_timeout", handshake)
                return await create_server(*args, **kw)

            loop.create_server = create_server_with_deadline  # type: ignore[method-assign]
            tasks = [
                asyncio.ensure_future(srv.serve(sockets=[sock]))
                for srv, (_, sock) in zip(self._servers, self._configs, strict=True)
            ]
            while not all(s.started for s in self._servers):
                if any(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.01)
            started.set()
            await asyncio.gather(*tasks)

        def run() -> None:
            try:
                asyncio.run(main())
            except BaseException:
                log.exception("the API server stopped")
            finally:
                started.set()

        self._thread = threading.Thread(target=run, name="vmms-api", daemon=True)
        self._thread.start()
        started.wait(30)
        if not all(s.started for s in self._servers):
            raise ServeError("the API server did not start (see the log)")

    def close(self) -> None:
        for srv in self._servers:
            srv.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
        self.unix.close()
        if self._tcp_sock is not None:
            self._tcp_sock.close()
