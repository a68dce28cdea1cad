"""The VMMS's HTTP/JSON API, an ASGI application (Starlette; served by uvicorn, pyhv.vmms.server):
each request is checked (route, method, who it is from and what that scope may do, body size,
content type, the body against its declaration in pyhv.vmms.bodies) and translated into one
call of the service, made on a thread of a bounded pool (the service blocks); errors are JSON
``{"error": message, "status": code}`` with a 4xx status that says what was wrong (a body's
field by its path, e.g. ``$.weight``). Nothing reaches a worker unchecked. The routes are
documented in pyhv.vmms.openapi.

The console and the flight recorder stream both ways over one request: the request's body
(chunked) is what the client sends, the answer's body (chunked) what the VMMS sends, while
both stay open (pyhv.vmms.client speaks it).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from pyhv.counters.registry import CounterSet
from pyhv.vmms import bodies
from pyhv.vmms.auth import (
    ADMIN,
    CHART,
    CLUSTER,
    COOKIE,
    COOKIE_TTL,
    MIGRATE,
    Authenticator,
    AuthError,
)
from pyhv.vmms.openapi import openapi
from pyhv.vmms.outqueue import BoundedOutput
from pyhv.vmms.service import Vmms, VmmsError

log = logging.getLogger(__name__)

#: Output a console client may leave unread before it is dropped (bytes), and how long one
#: send to it may wait for the client to read.
CONSOLE_BUFFER_BYTES = 1 << 20
CONSOLE_SEND_TIMEOUT = 10.0
#: Events a trace client may leave unread (then they are dropped and counted).
TRACE_QUEUE = 8192

MAX_BODY = 64 << 10
#: Seconds a request's body may take to arrive once its head has (by default).
BODY_TIMEOUT = 30.0
#: Service calls running at once (each on a thread); more wait their turn.
SERVICE_THREADS = 16

_KNOWN_METHODS = {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class _Gone(Exception):
    """The client went away before its request was read."""


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


class Redirect:
    """303 to `location`, with headers (the chart page's cookie)."""

    def __init__(self, location: str, headers: dict[str, str]) -> None:
        self.location = location
        self.headers = headers


@dataclass
class ApiState:
    """What every route needs: the service, who may do what (None: the Unix socket, whose
    owner is the administrator), the thread pool's bound, and the TCP API's own URL (for the
    chart page's one-time URL)."""

    vmms: Vmms
    auth: Authenticator | None
    trusted: bool
    tcp_url: str | None = None
    body_timeout: float = BODY_TIMEOUT
    counters: CounterSet | None = None  # pyhv.vmms.httpconn.API_SET
    instance: str = "unix"
    limiter: anyio.CapacityLimiter = field(
        default_factory=lambda: anyio.CapacityLimiter(SERVICE_THREADS)
    )


def _count(state: ApiState, counter: str) -> None:
    if state.counters is not None:
        state.counters.add(counter, 1, state.instance)


class Call:
    """One request as its route handler sees it (on a thread of the bounded pool): the service,
    the path's parameters, the query, the scope it was authenticated for, the body."""

    def __init__(
        self,
        state: ApiState,
        params: dict[str, str],
        query: Mapping[str, str],
        headers: Mapping[str, str],
        raw_body: bytes | None,
        who: str,
        local_host: str | None = None,
    ) -> None:
        self.state = state
        self.local_host = local_host  # the address the client reached (TCP)
        self.vmms = state.vmms
        self.params = params
        self.query = query
        self.headers = headers
        self.raw_body = raw_body
        self.who = who

    def body(self, kind: type[Any], required: bool = True) -> Any:
        """The request's body as the declared `kind` (pyhv.vmms.bodies); 4xx for anything
        else, naming the field that is wrong."""
        try:
            return bodies.decode(self._json_object(required), kind)
        except bodies.BodyError as e:
            raise ApiError(400, str(e)) from None

    def _json_object(self, required: bool) -> dict[str, Any]:
        raw = self.raw_body
        if raw is None:
            if required:
                raise ApiError(411, "this request needs a JSON body with a Content-Length")
            return {}
        if not raw:
            if required:
                raise ApiError(400, "the body is empty: send a JSON object")
            return {}
        ctype = self.headers.get("content-type", "").split(";")[0].strip().lower()
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


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


Handler = Callable[[Call], Any]
StreamHandler = Callable[[Request, ApiState], Awaitable[Any]]


@dataclass
class _Method:
    handler: Any  # Handler, or StreamHandler when `stream`
    scopes: frozenset[str]
    stream: bool = False


#: path template (Starlette's, e.g. /api/vms/{name}) -> method -> what serves it
_ROUTES: dict[str, dict[str, _Method]] = {}


def route(
    path: str, method: str, *, scopes: tuple[str, ...] = (ADMIN,), stream: bool = False
) -> Callable[[Any], Any]:
    """Register a handler of `method` on `path` for callers of `scopes` (admin by default).
    A stream handler is async and answers with its own ASGI response."""

    def register(fn: Any) -> Any:
        _ROUTES.setdefault(path, {})[method] = _Method(fn, frozenset(scopes), stream)
        return fn

    return register


# --- plumbing --------------------------------------------------------------------------------


def _json_response(status: int, value: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(value, indent=1).encode() + b"\n"
    return Response(
        body,
        status,
        {"Cache-Control": "no-store", **(headers or {})},
        media_type="application/json",
    )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    # The body may be unread: close the connection rather than parse it as a request.
    return _json_response(
        status, {"error": message, "status": status}, {**(headers or {}), "Connection": "close"}
    )


def _answer(result: Any) -> Response:
    if isinstance(result, Raw):
        return Response(result.body, 200, {"Cache-Control": "no-store"}, result.content_type)
    if isinstance(result, Redirect):
        return Response(b"", 303, {"Location": result.location, **result.headers})
    if isinstance(result, Accepted):
        return _json_response(202, result.value)
    if isinstance(result, Created):
        return _json_response(201, result.value)
    if result is None:
        return Response(b"", 204, {"Cache-Control": "no-store"})
    return _json_response(200, result)


_SCOPE_WORDS = {
    MIGRATE: "the migration token may only bring a VM in (POST /api/migrations/incoming, "
    "GET or DELETE /api/migrations/{id} of an incoming migration): use the admin token "
    "(file 'token') for this",
    CLUSTER: "the cluster token only places VMs here (POST /api/vms, POST /api/vms/{name}/start, "
    "POST /api/vms/{name}/migrate and GET /api/migrations/{id}): use the admin token (file "
    "'token') for this",
    CHART: "the chart page's cookie only reads the counters: use the admin token for this",
}


def _authenticate(request: Request, state: ApiState, allowed: frozenset[str]) -> str:
    """The scope of the request's caller, if `allowed`; ApiError 401/403 otherwise."""
    if "token" in request.query_params:
        raise ApiError(
            401,
            "a token in the URL (?token=) is refused: URLs end up in logs and histories. Send "
            "'Authorization: Bearer <token>' (the chart page: `pyhv vmms chart` prints a "
            "one-time URL)",
            {"WWW-Authenticate": 'Bearer realm="pyhv-vmms"'},
        )
    if state.trusted:
        return ADMIN  # the Unix socket: its file permissions let only its owner in
    assert state.auth is not None
    if "code" in allowed and "code" in request.query_params:
        return "code"  # the chart page's one-time code, exchanged by its route
    try:
        who = state.auth.scope_of(request.headers, request.cookies)
    except AuthError as e:
        raise ApiError(e.status, str(e), {"WWW-Authenticate": 'Bearer realm="pyhv-vmms"'}) from None
    if who not in allowed:
        raise ApiError(403, _SCOPE_WORDS.get(who, f"scope {who!r} may not do this"))
    return who


async def _read_body(request: Request, timeout: float) -> bytes | None:
    """The request's body (None if it has none), at most MAX_BODY bytes, within `timeout`."""
    h = request.headers
    if "transfer-encoding" in h:
        raise ApiError(411, "chunked bodies are not accepted: send Content-Length")
    length_text = h.get("content-length")
    if length_text is None:
        return None
    if not (length_text.isascii() and length_text.isdigit()):
        raise ApiError(400, f"Content-Length {length_text!r} is not a byte count")
    length = int(length_text)
    if length > MAX_BODY:
        raise ApiError(413, f"body of {length} bytes is too large: at most {MAX_BODY}")
    data = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                data += chunk
    except TimeoutError:
        raise ApiError(
            408, f"the body did not arrive within {timeout:g} s: send it at once"
        ) from None
    except ClientDisconnect:
        raise _Gone from None
    return bytes(data)


def _endpoint(methods: dict[str, _Method]) -> Callable[[Request], Awaitable[Any]]:
    async def endpoint(request: Request) -> Any:
        state: ApiState = request.app.state.api
        method = request.method
        m = methods.get("GET" if method == "HEAD" else method)
        assert m is not None  # Starlette answered 405 otherwise
        try:
            who = _authenticate(request, state, m.scopes)
            if m.stream:
                return await m.handler(request, state)
            raw_body = await _read_body(request, state.body_timeout)
            call = Call(
                state,
                dict(request.path_params),
                request.query_params,
                request.headers,
                raw_body,
                who,
                (request.scope.get("server") or (None,))[0],
            )
            result = await anyio.to_thread.run_sync(m.handler, call, limiter=state.limiter)
        except ApiError as e:
            if e.status in (401, 403):
                _count(state, "Credentials Refused")
            return _error(e.status, str(e), e.headers)
        except VmmsError as e:
            return _error(e.status, str(e))
        except _Gone:
            return Response(b"", 400, {"Connection": "close"})  # nobody reads it
        except Exception as e:  # noqa: BLE001 - a bug answers 500, never kills the service
            log.exception("%s %s failed", method, request.url.path)
            return _error(500, f"internal error: {type(e).__name__}: {e}")
        return _answer(result)

    return endpoint


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, f"no such resource {request.url.path!r}: GET /openapi.json lists the API")


async def _not_allowed(request: Request, exc: Exception) -> Response:
    method = request.method
    if method not in _KNOWN_METHODS:
        return _error(501, f"method {method!r} is not supported: use GET, POST, PATCH or DELETE")
    headers = getattr(exc, "headers", None) or {}
    allowed = ", ".join(
        sorted(m for m in headers.get("Allow", "").split(", ") if m and m != "HEAD")
    )
    return _error(
        405, f"{method} is not allowed on {request.url.path}: use {allowed}", {"Allow": allowed}
    )


def make_app(state: ApiState) -> Starlette:
    """The API as an ASGI application for one server (the Unix socket's, or TCP's)."""
    routes = [
        Route(path, _endpoint(methods), methods=sorted(methods))
        for path, methods in _ROUTES.items()
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={404: _not_found, 405: _not_allowed, HTTPException: _http_error},
    )
    app.state.api = state
    return app


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 400)
    return _error(status, str(getattr(exc, "detail", exc)))


def _page() -> bytes:
    return resources.files("pyhv.vmms").joinpath("static/perfmon.html").read_bytes()


# --- the routes ----------------------------------------------------------------------------


@route("/", "GET", scopes=(ADMIN, CHART, "code"))
@route("/perfmon", "GET", scopes=(ADMIN, CHART, "code"))
def _perfmon(c: Call) -> Raw | Redirect:
    if c.who == "code":
        # A one-time code from `pyhv vmms chart`: spent now for a short-lived cookie that
        # scripts cannot read and other sites cannot send; the URL without the code follows.
        assert c.state.auth is not None
        try:
            cookie = c.state.auth.exchange(c.query["code"])
        except AuthError as e:
            raise ApiError(e.status, str(e)) from None
        secure = "; Secure" if (c.state.tcp_url or "").startswith("https:") else ""
        return Redirect(
            "/perfmon",
            {
                "Set-Cookie": f"{COOKIE}={cookie}; Max-Age={int(COOKIE_TTL)}; Path=/; HttpOnly; "
                f"SameSite=Strict{secure}",
                "Cache-Control": "no-store",
            },
        )
    return Raw(_page(), "text/html; charset=utf-8")


@route("/api/chart-codes", "POST")
def _chart_code(c: Call) -> Any:
    c.body(bodies.NoFields, required=False)
    if c.state.auth is None or c.state.tcp_url is None:
        raise ApiError(
            409, "the chart page is served over TCP: start the VMMS with --tcp HOST:PORT"
        )
    code = c.state.auth.new_code()
    return Created({"url": f"{c.state.tcp_url}/perfmon?code={code}"})


@route("/openapi.json", "GET")
def _openapi(c: Call) -> Any:
    return openapi()


@route("/metrics", "GET")
def _metrics(c: Call) -> Raw:
    return Raw(c.vmms.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8")


@route("/api/counters", "GET", scopes=(ADMIN, CHART))
def _counters(c: Call) -> Any:
    return {"time": time.time(), "counters": c.vmms.counters()}


@route("/api/host", "GET")
def _host(c: Call) -> Any:
    return c.vmms.host()


@route("/api/vms", "GET")
def _list(c: Call) -> Any:
    return {"vms": c.vmms.list()}


def _peer_may(c: Call, vm: str, destination: str | None = None) -> None:
    """The cluster token acts only on the VMs the cluster gives this host, and moves them only
    to its hosts: the cluster agent's `peer_guard` (pyhv.cluster.membership) says, 403 if not."""
    if c.who != CLUSTER:
        return
    guard = getattr(c.vmms, "peer_guard", None)
    if guard is None:
        raise ApiError(403, "this VMMS is in no cluster: the cluster token places nothing here")
    guard(vm, destination)


@route("/api/vms", "POST", scopes=(ADMIN, CLUSTER))
def _create(c: Call) -> Any:
    settings = c.body(bodies.Settings)
    _peer_may(c, settings.name)
    return Created(c.vmms.create(bodies.given(settings)))


@route("/api/vms/{name}", "GET")
def _show(c: Call) -> Any:
    return c.vmms.describe(c.params["name"])


@route("/api/vms/{name}", "PATCH")
def _update(c: Call) -> Any:
    return c.vmms.update(c.params["name"], bodies.given(c.body(bodies.SettingsChange)))


@route("/api/vms/{name}", "DELETE")
def _delete(c: Call) -> None:
    c.vmms.delete(c.params["name"])


@route("/api/vms/{name}/start", "POST", scopes=(ADMIN, CLUSTER))
def _start(c: Call) -> Any:
    _peer_may(c, c.params["name"])
    if c.body(bodies.Start, required=False).restart:
        return c.vmms.restart(c.params["name"])
    return c.vmms.start(c.params["name"])


@route("/api/vms/{name}/stop", "POST")
def _stop(c: Call) -> Any:
    c.body(bodies.NoFields, required=False)
    return c.vmms.stop(c.params["name"])


@route("/api/vms/{name}/memory", "GET")
def _memory(c: Call) -> Any:
    return c.vmms.memory_status(c.params["name"])


@route("/api/vms/{name}/memory", "POST")
def _memory_target(c: Call) -> Any:
    body = c.body(bodies.MemoryTarget)
    c.vmms.set_memory_target(c.params["name"], body.target)
    return {"name": c.params["name"], "target": body.target, "accepted": True}


@route("/api/vms/{name}/memory/resize", "POST")
def _memory_resize(c: Call) -> Any:
    return c.vmms.resize_memory(c.params["name"], c.body(bodies.MemoryResize).memory)


@route("/api/vms/{name}/migrate", "POST", scopes=(ADMIN, CLUSTER))
def _migrate(c: Call) -> Any:
    request = c.body(bodies.MigrateRequest)
    _peer_may(c, c.params["name"], request.destination)
    return Accepted(c.vmms.migrations.start(c.params["name"], bodies.given(request)))


@route("/api/migrations", "GET")
def _migrations(c: Call) -> Any:
    return {"migrations": c.vmms.migrations.list()}


# The destination side of a live migration: what a migration token may do.
@route("/api/migrations/incoming", "POST", scopes=(ADMIN, MIGRATE))
def _incoming(c: Call) -> Any:
    answer = c.vmms.migrations.prepare_incoming(bodies.given(c.body(bodies.IncomingRequest)))
    if answer.get("host") in ("0.0.0.0", "::") and c.local_host:
        answer["host"] = c.local_host  # a VMMS on every address: where the source reached it
    return Created(answer)


@route("/api/migrations/{id}", "GET", scopes=(ADMIN, MIGRATE, CLUSTER))
def _migration(c: Call) -> Any:
    rec = c.vmms.migrations.get(c.params["id"])
    if c.who == MIGRATE and rec["direction"] != "incoming":
        raise ApiError(404, f"no incoming migration {c.params['id']!r} on this host")
    return rec


@route("/api/migrations/{id}", "DELETE", scopes=(ADMIN, MIGRATE))
def _cancel_migration(c: Call) -> Any:
    return c.vmms.migrations.cancel(c.params["id"])  # (incoming ones only)


@route("/api/migrations/{id}/resolve", "POST")
def _resolve_migration(c: Call) -> Any:
    return c.vmms.migrations.resolve(c.params["id"], bodies.given(c.body(bodies.Resolve)))


# --- streams: the console and the flight recorder ---------------------------------------------


def _waker(loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> Callable[[], None]:
    """A function any thread may call to set `ready` on the API's event loop."""

    def wake() -> None:
        try:
            loop.call_soon_threadsafe(ready.set)
        except RuntimeError:
            pass  # the loop has closed: the VMMS is stopping

    return wake


def _abort_of(request: Request, state: ApiState) -> Callable[[], None]:
    """Drops the connection at once, whatever it has unsent (pyhv.vmms.httpconn), counted."""
    abort = request.scope.get("extensions", {}).get("pyhv.abort")

    def drop() -> None:
        _count(state, "Stream Clients Dropped")
        if abort is not None:
            abort()

    return drop


def _chunked(request: Request) -> bool:
    """The request's body is chunked: its last chunk says the client leaves."""
    return "chunked" in request.headers.get("transfer-encoding", "").lower()


_STREAM_HEADERS = [
    (b"content-type", b"application/octet-stream"),
    (b"cache-control", b"no-store"),
    (b"connection", b"close"),
]


class _Duplex:
    """An answer that streams: `writer` sends, `reader` takes what the client sends; when
    either ends, the other is stopped and `finish` runs. The writer ends the answer when its
    source ends; when the client ends its input (the request's last chunk), the answer is
    ended here and the connection closes."""

    def __init__(
        self,
        content_type: bytes,
        writer: Callable[[Any], Awaitable[None]],
        reader: Callable[[Any], Awaitable[bool]],
        finish: Callable[[], None],
        limiter: anyio.CapacityLimiter,
    ) -> None:
        self.content_type = content_type
        self.writer = writer
        self.reader = reader
        self.finish = finish
        self.limiter = limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        ended = False  # the answer's last chunk went out
        input_ended = False

        async def tracked_send(message: Any) -> None:
            nonlocal ended
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                ended = True

        async def read(receive: Any) -> None:
            nonlocal input_ended
            input_ended = await self.reader(receive) is True

        try:
            headers = [(b"content-type", self.content_type), *_STREAM_HEADERS[1:]]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with anyio.create_task_group() as tg:

                async def run(part: Callable[[Any], Awaitable[None]], arg: Any) -> None:
                    try:
                        await part(arg)
                    finally:
                        tg.cancel_scope.cancel()

                tg.start_soon(run, self.writer, tracked_send)
                tg.start_soon(run, read, receive)
            if input_ended and not ended:
                with anyio.move_on_after(CONSOLE_SEND_TIMEOUT):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self.finish, limiter=self.limiter)


async def _send_within(send: Any, data: bytes, more: bool, what: str, abort: Any) -> bool:
    """Send `data`; False (and the connection dropped) if the client does not take it within
    CONSOLE_SEND_TIMEOUT (so at most one send's worth waits in the connection's buffer)."""
    try:
        with anyio.fail_after(CONSOLE_SEND_TIMEOUT):
            await send({"type": "http.response.body", "body": data, "more_body": more})
            if more:
                # uvicorn waits for the client only before a write: an empty one (h11 sends
                # nothing for it) waits until the client has taken what this one left queued.
                await send({"type": "http.response.body", "body": b"", "more_body": True})
        return True
    except TimeoutError:
        log.warning(
            "%s: a client that does not read for %g s was dropped", what, CONSOLE_SEND_TIMEOUT
        )
        abort()
        return False


@route("/api/vms/{name}/console", "POST", stream=True)
async def _console(request: Request, state: ApiState) -> Any:
    """The VM's serial console: the request's body is typed, the answer's body is what the
    guest prints (the recent output first), until the VM ends or the client leaves."""
    name = request.path_params["name"]
    vmms = state.vmms
    ready = asyncio.Event()
    wake = _waker(asyncio.get_running_loop(), ready)
    abort = _abort_of(request, state)
    what = f"VM {name}'s console"
    # A console that does not read loses its connection, not the VM (nor the VMMS's memory).
    out = BoundedOutput(CONSOLE_BUFFER_BYTES, wake)

    def sink(data: bytes) -> None:
        out.put(data)
        wake()

    detach = await anyio.to_thread.run_sync(vmms.attach, name, sink, limiter=state.limiter)
    chunked = _chunked(request)

    async def writer(send: Any) -> None:
        while True:
            await ready.wait()
            ready.clear()
            data = out.take()
            if data is None:
                log.warning("%s: a client that does not read was dropped", what)
                abort()
                return
            if data and not await _send_within(send, data, True, what, abort):
                return
            if out.ended:
                await _send_within(send, b"", False, what, abort)  # the VM ended
                return

    async def reader(receive: Any) -> bool:
        """True when the client ended its input (it leaves), False when it went away. (A
        request without a chunked body has no input to end: only its leaving counts.)"""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            data = message.get("body", b"")
            if data:
                try:
                    await anyio.to_thread.run_sync(vmms.type, name, data, limiter=state.limiter)
                except VmmsError:
                    return False
            if not message.get("more_body", False) and chunked:
                return True

    return _Duplex(b"application/octet-stream", writer, reader, detach, state.limiter)


# --- flight recorder (pyhv.trace): one route; its message is each event's wire form ----------
@route("/api/vms/{name}/trace", "POST", stream=True)
async def _trace(request: Request, state: ApiState) -> Any:
    """VM NAME's flight recorder: one JSON event a line, while the client stays (the VM's event
    sources are on while anyone watches); `?only=dm,io` asks for those kinds only (and only
    their sources are turned on)."""
    from pyhv.trace.events import TraceError, parse_only
    from pyhv.trace.recorder import LINGER, BoundedStream

    name = request.path_params["name"]
    try:
        kinds = parse_only(",".join(request.query_params.getlist("only")))
    except TraceError as e:
        raise ApiError(400, str(e).replace("--only", "only=")) from None
    stream = BoundedStream(TRACE_QUEUE)  # a slow client loses events ("dropped"), not memory
    ready = asyncio.Event()
    wake = _waker(asyncio.get_running_loop(), ready)
    abort = _abort_of(request, state)

    def out(events: list[Any] | None) -> None:
        if events is None:
            stream.close()
        else:
            for e in events:
                stream.put(e)
        wake()

    stop = await anyio.to_thread.run_sync(state.vmms.trace, name, out, kinds, limiter=state.limiter)
    chunked = _chunked(request)

    async def writer(send: Any) -> None:
        while True:
            await ready.wait()
            ready.clear()
            while (events := stream.take(timeout=0, most=512)) is not None:
                if not events:
                    break
                lines = b"".join(
                    json.dumps(e.to_wire(), separators=(",", ":")).encode() + b"\n" for e in events
                )
                if not await _send_within(send, lines, True, f"VM {name}'s trace", abort):
                    return
                if len(events) < 512:
                    await anyio.sleep(LINGER)  # let the next batch grow
            if events is None:
                await _send_within(send, b"", False, f"VM {name}'s trace", abort)
                return

    async def reader(receive: Any) -> bool:
        """The client sends nothing; its leaving (or its input's end: True) ends the stream."""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return False
            if not message.get("more_body", False) and chunked:
                return True

    def finish() -> None:
        stop()
        stream.close()

    return _Duplex(b"application/x-ndjson", writer, reader, finish, state.limiter)
