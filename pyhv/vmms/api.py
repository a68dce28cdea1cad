"""The VMMS's HTTP/JSON API: each request is checked (route, method, auth, body size, content
type, the body against its declaration in pyhv.vmms.bodies) and translated into one call of
the service; errors are JSON ``{"error": message, "status": code}`` with a 4xx status that says
what was wrong (a body's field by its path, e.g. ``$.weight``). Nothing reaches a worker
unchecked. The routes are documented in pyhv.vmms.openapi.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pyhv.vmms import bodies
from pyhv.vmms.client import CONSOLE_PROTOCOL, TRACE_PROTOCOL
from pyhv.vmms.openapi import openapi
from pyhv.vmms.outqueue import BoundedOutput
from pyhv.vmms.service import Vmms, VmmsError

log = logging.getLogger(__name__)

#: Output a console client may leave unread before it is dropped (bytes), and how long one
#: send to it may block.
CONSOLE_BUFFER_BYTES = 1 << 20
CONSOLE_SEND_TIMEOUT = 10.0

MAX_BODY = 64 << 10
_NAME = r"(?P<name>[^/]+)"


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


Handler = Callable[["ApiHandler", dict[str, str]], Any]
_ROUTES: list[tuple[re.Pattern[str], dict[str, Handler]]] = []


def route(pattern: str, method: str) -> Callable[[Handler], Handler]:
    rx = re.compile(f"^{pattern}$")

    def register(fn: Handler) -> Handler:
        for existing, methods in _ROUTES:
            if existing.pattern == rx.pattern:
                methods[method] = fn
                break
        else:
            _ROUTES.append((rx, {method: fn}))
        return fn

    return register


class Raw:
    """A non-JSON response body."""

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type


class Created:
    def __init__(self, value: Any) -> None:
        self.value = value


class Accepted(Created):
    """202: the work goes on after the answer (a migration: poll its record)."""


class ApiHandler(BaseHTTPRequestHandler):
    """One connection; `server.vmms` is the service, `server.token` the bearer token (TCP)."""

    protocol_version = "HTTP/1.1"
    server_version = "pyhv-vmms"
    timeout = 120  # an idle keep-alive connection does not hold a thread forever

    # --- plumbing ------------------------------------------------------------------------

    @property
    def vmms(self) -> Vmms:
        return self.server.vmms  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address, *args)

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        try:
            self._authenticate()
            fn, params = self._route(method, url.path)
            result = fn(self, params)
        except ApiError as e:
            self._error(e.status, str(e), e.headers)
            return
        except VmmsError as e:
            self._error(e.status, str(e))
            return
        except Exception as e:  # noqa: BLE001 - a bug answers 500, never kills the service
            log.exception("%s %s failed", method, self.path)
            self._error(500, f"internal error: {type(e).__name__}: {e}")
            return
        if result is _UPGRADED:
            return
        if isinstance(result, Raw):
            self._send(200, result.body, result.content_type)
        elif isinstance(result, Accepted):
            self._json(202, result.value)
        elif isinstance(result, Created):
            self._json(201, result.value)
        elif result is None:
            self._send(204, b"", None)
        else:
            self._json(200, result)

    def _authenticate(self) -> None:
        token = getattr(self.server, "token", None)
        if token is None:
            return  # a Unix socket: its file permissions let only its owner in
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer":
            value = (self.query.get("token") or [""])[0]  # a browser opening the chart page
        if not value or not hmac.compare_digest(value.encode(), token.encode()):
            why = "a wrong bearer token" if value else "no bearer token"
            raise ApiError(
                401,
                f"{why}: send 'Authorization: Bearer <token>' with the token the VMMS wrote to "
                "its state directory (file 'token')",
                {"WWW-Authenticate": 'Bearer realm="pyhv-vmms"'},
            )

    def _route(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        for rx, methods in _ROUTES:
            m = rx.match(path)
            if m is None:
                continue
            fn = methods.get(method)
            if fn is None:
                allowed = ", ".join(sorted(methods))
                raise ApiError(
                    405, f"{method} is not allowed on {path}: use {allowed}", {"Allow": allowed}
                )
            return fn, m.groupdict()
        raise ApiError(404, f"no such resource {path!r}: GET /openapi.json lists the API")

    def _body(self, kind: type[Any], required: bool = True) -> Any:
        """The request's body as the declared `kind` (pyhv.vmms.bodies); 4xx for anything
        else, naming the field that is wrong."""
        try:
            return bodies.decode(self._json_object(required), kind)
        except bodies.BodyError as e:
            raise ApiError(400, str(e)) from None

    def _json_object(self, required: bool) -> dict[str, Any]:
        """The request's JSON object; 4xx for anything else."""
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked bodies are not accepted: send Content-Length")
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if required:
                raise ApiError(411, "this request needs a JSON body with a Content-Length")
            return {}
        if not (length_text.isascii() and length_text.isdigit()):  # not "²": int() refuses it
            raise ApiError(400, f"Content-Length {length_text!r} is not a byte count")
        length = int(length_text)
        if length > MAX_BODY:
            raise ApiError(413, f"body of {length} bytes is too large: at most {MAX_BODY}")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ApiError(400, f"body ended after {len(raw)} of {length} bytes")
        if not raw:
            if required:
                raise ApiError(400, "the body is empty: send a JSON object")
            return {}
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(
                415, f"Content-Type {ctype or 'none'!r} is not accepted: send application/json"
            )
        try:
            value = json.loads(raw, parse_constant=_no_constants)
        except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deeply
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ApiError(400, f"the body must be a JSON object, not {type(value).__name__}")
        return value

    def _send(
        self, status: int, body: bytes, ctype: str | None, headers: dict[str, str] | None = None
    ) -> None:
        self.send_response(status)
        if ctype:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value, indent=1).encode() + b"\n"
        self._send(status, body, "application/json", headers)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        # The body may be unread: close the connection rather than parse it as a request.
        self.close_connection = True
        self._json(
            status, {"error": message, "status": status}, {**(headers or {}), "Connection": "close"}
        )

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method) as JSON too."""
        text = message or HTTPStatus(code).phrase
        self.request_version = self.protocol_version  # answer with a status line, even to junk
        if code == 501:
            text = f"method {self.command!r} is not supported: use GET, POST, PATCH or DELETE"
        try:
            self._error(code, text)
        except OSError:
            pass


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


_UPGRADED = object()


def _page() -> bytes:
    return resources.files("pyhv.vmms").joinpath("static/perfmon.html").read_bytes()


# --- the routes ----------------------------------------------------------------------------


@route("/", "GET")
@route("/perfmon", "GET")
def _perfmon(h: ApiHandler, p: dict[str, str]) -> Raw:
    return Raw(_page(), "text/html; charset=utf-8")


@route("/openapi.json", "GET")
def _openapi(h: ApiHandler, p: dict[str, str]) -> Any:
    return openapi()


@route("/metrics", "GET")
def _metrics(h: ApiHandler, p: dict[str, str]) -> Raw:
    return Raw(h.vmms.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")


@route("/api/counters", "GET")
def _counters(h: ApiHandler, p: dict[str, str]) -> Any:
    return {"time": time.time(), "counters": h.vmms.counters()}


@route("/api/host", "GET")
def _host(h: ApiHandler, p: dict[str, str]) -> Any:
    return h.vmms.host()


@route("/api/vms", "GET")
def _list(h: ApiHandler, p: dict[str, str]) -> Any:
    return {"vms": h.vmms.list()}


@route("/api/vms", "POST")
def _create(h: ApiHandler, p: dict[str, str]) -> Any:
    return Created(h.vmms.create(bodies.given(h._body(bodies.Settings))))


@route(f"/api/vms/{_NAME}", "GET")
def _show(h: ApiHandler, p: dict[str, str]) -> Any:
    return h.vmms.describe(p["name"])


@route(f"/api/vms/{_NAME}", "PATCH")
def _update(h: ApiHandler, p: dict[str, str]) -> Any:
    return h.vmms.update(p["name"], bodies.given(h._body(bodies.SettingsChange)))


@route(f"/api/vms/{_NAME}", "DELETE")
def _delete(h: ApiHandler, p: dict[str, str]) -> None:
    h.vmms.delete(p["name"])


@route(f"/api/vms/{_NAME}/start", "POST")
def _start(h: ApiHandler, p: dict[str, str]) -> Any:
    h._body(bodies.NoFields, required=False)
    return h.vmms.start(p["name"])


@route(f"/api/vms/{_NAME}/stop", "POST")
def _stop(h: ApiHandler, p: dict[str, str]) -> Any:
    h._body(bodies.NoFields, required=False)
    return h.vmms.stop(p["name"])


@route(f"/api/vms/{_NAME}/memory", "GET")
def _memory(h: ApiHandler, p: dict[str, str]) -> Any:
    return h.vmms.memory_status(p["name"])


@route(f"/api/vms/{_NAME}/memory", "POST")
def _memory_target(h: ApiHandler, p: dict[str, str]) -> Any:
    body = h._body(bodies.MemoryTarget)
    h.vmms.set_memory_target(p["name"], body.target)
    return {"name": p["name"], "target": body.target, "accepted": True}


@route(f"/api/vms/{_NAME}/migrate", "POST")
def _migrate(h: ApiHandler, p: dict[str, str]) -> Any:
    return Accepted(
        h.vmms.migrations.start(p["name"], bodies.given(h._body(bodies.MigrateRequest)))
    )


@route("/api/migrations", "GET")
def _migrations(h: ApiHandler, p: dict[str, str]) -> Any:
    return {"migrations": h.vmms.migrations.list()}


@route("/api/migrations/incoming", "POST")
def _incoming(h: ApiHandler, p: dict[str, str]) -> Any:
    return Created(
        h.vmms.migrations.prepare_incoming(bodies.given(h._body(bodies.IncomingRequest)))
    )


@route("/api/migrations/(?P<id>[^/]+)", "GET")
def _migration(h: ApiHandler, p: dict[str, str]) -> Any:
    return h.vmms.migrations.get(p["id"])


@route("/api/migrations/(?P<id>[^/]+)/resolve", "POST")
def _resolve_migration(h: ApiHandler, p: dict[str, str]) -> Any:
    return h.vmms.migrations.resolve(p["id"], bodies.given(h._body(bodies.Resolve)))


@route("/api/migrations/(?P<id>[^/]+)", "DELETE")
def _cancel_migration(h: ApiHandler, p: dict[str, str]) -> Any:
    return h.vmms.migrations.cancel(p["id"])


def _need_upgrade(h: ApiHandler, what: str, protocol: str) -> None:
    """A 426 unless the request asks to upgrade the connection to `protocol`."""
    if h.headers.get("Upgrade", "").lower() != protocol:
        raise ApiError(
            426,
            f"{what} is a connection upgrade: send 'Connection: Upgrade' and 'Upgrade: {protocol}'",
            {"Upgrade": protocol},
        )


@route(f"/api/vms/{_NAME}/console", "POST")
def _console(h: ApiHandler, p: dict[str, str]) -> Any:
    """Upgrade the connection to the VM's serial console: raw bytes both ways."""
    _need_upgrade(h, "the console", CONSOLE_PROTOCOL)
    name = p["name"]
    sock = h.connection

    def drop() -> None:
        # A console that does not read loses its connection, not the VM (nor the VMMS's memory).
        log.warning("VM %s: a console client that does not read was dropped", name)
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    out = BoundedOutput(CONSOLE_BUFFER_BYTES, drop)
    detach = h.vmms.attach(name, out.put)  # raises 404/409 before the upgrade
    h.send_response(101)
    h.send_header("Connection", "Upgrade")
    h.send_header("Upgrade", CONSOLE_PROTOCOL)
    h.end_headers()
    h.wfile.flush()
    sock.settimeout(None)  # a console may sit idle as long as its user likes...
    # ...but a send the client does not take within CONSOLE_SEND_TIMEOUT fails (EAGAIN).
    secs = int(CONSOLE_SEND_TIMEOUT)
    usecs = int((CONSOLE_SEND_TIMEOUT - secs) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", secs, usecs))

    def writer() -> None:
        while (data := out.get()) is not None and data:
            try:
                sock.sendall(data)
            except OSError:
                break
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the VM ended or the client went away: end the reader
        except OSError:
            pass

    t = threading.Thread(target=writer, name=f"console-{name}", daemon=True)
    t.start()
    try:
        while True:
            data = h.rfile.read1(4096)  # type: ignore[attr-defined]
            if not data:
                break
            h.vmms.type(name, data)
    except (OSError, VmmsError):
        pass
    finally:
        detach()
        out.put(b"")
        t.join(CONSOLE_SEND_TIMEOUT + 5)
        h.close_connection = True
    return _UPGRADED


# --- flight recorder (pyhv.trace): one route; its message is each event's wire form ----------
@route(f"/api/vms/{_NAME}/trace", "POST")
def _trace(h: ApiHandler, p: dict[str, str]) -> Any:
    """Upgrade the connection to VM NAME's flight recorder stream: one JSON event a line,
    while the connection stays open (the VM's event sources are on while anyone watches);
    `?only=dm,io` asks for those kinds only (and only their sources are turned on)."""
    from pyhv.trace.events import TraceError, parse_only
    from pyhv.trace.recorder import LINGER, BoundedStream

    _need_upgrade(h, "the trace", TRACE_PROTOCOL)
    name = p["name"]
    try:
        kinds = parse_only(",".join(h.query.get("only", [])))
    except TraceError as e:
        raise ApiError(400, str(e).replace("--only", "only=")) from None
    stream = BoundedStream(TRACE_QUEUE)  # a slow client loses events ("dropped"), not memory

    def out(events: list[Any] | None) -> None:
        if events is None:
            stream.close()
            return
        for e in events:
            stream.put(e)

    stop = h.vmms.trace(name, out, kinds)  # raises 404/409 before the upgrade
    h.send_response(101)
    h.send_header("Connection", "Upgrade")
    h.send_header("Upgrade", TRACE_PROTOCOL)
    h.end_headers()
    h.wfile.flush()
    sock = h.connection
    sock.settimeout(None)

    def writer() -> None:
        while True:
            events = stream.take(timeout=1.0, most=512)
            if events is None:
                break
            lines = b"".join(
                json.dumps(e.to_wire(), separators=(",", ":")).encode() + b"\n" for e in events
            )
            try:
                if lines:
                    sock.sendall(lines)
            except OSError:
                break
            if len(events) < 512:
                time.sleep(LINGER)  # let the next batch grow
        try:
            sock.shutdown(2)  # the VM ended or the client left: end the reader too
        except OSError:
            pass

    t = threading.Thread(target=writer, name=f"trace-{name}", daemon=True)
    t.start()
    try:
        while h.rfile.read1(4096):  # type: ignore[attr-defined]
            pass  # the client sends nothing; its EOF says it left
    except OSError:
        pass
    finally:
        stop()
        stream.close()
        t.join(5)
        h.close_connection = True
    return _UPGRADED


TRACE_QUEUE = 8192
