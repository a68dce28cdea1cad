"""One HTTP connection of the VMMS API: uvicorn's h11 protocol with what an API exposed before
authentication needs on top (issue 11, finding 6): a cap on open connections (at the cap a new
connection evicts the connection that has waited longest for a request head, or is closed at
once if every connection is busy: file descriptors stay bounded, and idle connections cannot
lock out a client that sends its request), a deadline for each request's head (a client that
trickles its headers, or sends nothing, is dropped), malformed requests answered with the
API's JSON error, and a way for a streaming route to abort a connection whose client stopped
reading (``scope["extensions"]["pyhv.abort"]``), and a request whose client ended its side
of the connection after sending it (a half-close: ``shutdown(SHUT_WR)``, ``nc -N``) answered
before the connection closes (uvicorn closes at once on EOF and drops the answer).

Built on uvicorn 0.54's H11Protocol (pinned in pyproject.toml): it overrides connection_made,
handle_events, on_response_complete, eof_received and send_400_response."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pyhv.counters.registry import CounterDef, CounterSet, CounterSetDef

log = logging.getLogger(__name__)

#: What the API's sockets met, per socket ("unix", "tcp").
API_SET = CounterSetDef(
    "pyhv VMMS API",
    (
        CounterDef("Open Connections", "connections open now", "count"),
        CounterDef(
            "Connections Evicted",
            "idle connections dropped to make room at the cap",
            "count",
            "cumulative",
        ),
        CounterDef(
            "Connections Refused", "connections closed at the cap, all busy", "count", "cumulative"
        ),
        CounterDef(
            "Request Heads Timed Out",
            "connections dropped for a request head not complete in time",
            "count",
            "cumulative",
        ),
        CounterDef(
            "Malformed Requests", "requests the HTTP parser refused (400)", "count", "cumulative"
        ),
        CounterDef(
            "Credentials Refused",
            "requests refused for their token, cookie or code (401) or its scope (403)",
            "count",
            "cumulative",
        ),
        CounterDef(
            "Stream Clients Dropped",
            "console and trace clients dropped for not reading",
            "count",
            "cumulative",
        ),
    ),
    instance_label="socket",
)


class ApiConnection(H11Protocol):
    """Set on the uvicorn Config as ``http=``; the limits come from the class attributes of a
    subclass made per server (pyhv.vmms.server.connection_class)."""

    #: Open connections at most; one more is closed as soon as it is accepted.
    max_connections = 1024
    #: Seconds a request's head may take from the connection (or the previous answer) on.
    head_timeout = 10.0
    #: Where what happens is counted (API_SET), and this socket's instance there.
    counters: CounterSet | None = None
    instance = "unix"

    def _count(self, counter: str) -> None:
        if self.counters is not None:
            self.counters.add(counter, 1, self.instance)

    def _count_open(self) -> None:
        if self.counters is not None:
            self.counters.set("Open Connections", len(self.server_state.connections), self.instance)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_timer: asyncio.TimerHandle | None = None
        self._timed_scope: Any = None
        self._eof = False  # the client half-closed: answer what it sent whole, then close
        self._idle_since = self.loop.time()
        if len(self.server_state.connections) >= self.max_connections and not self._evict():
            log.warning(
                "API connection refused: %d connections are open (the cap), all busy",
                len(self.server_state.connections),
            )
            self._count("Connections Refused")
            transport.abort()
            return
        super().connection_made(transport)
        self._count_open()
        self._arm_head_timer()

    def _evict(self) -> bool:
        """Make room by dropping the connection idle the longest (no request in progress)."""
        idle = [
            c
            for c in self.server_state.connections
            if isinstance(c, ApiConnection)
            and (c.cycle is None or c.cycle.response_complete)  # waiting for a request head
            and not c.transport.is_closing()
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._idle_since)
        oldest.transport.abort()
        self.server_state.connections.discard(oldest)  # (connection_lost follows on the loop)
        self._count("Connections Evicted")
        return True

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:
            log.info("API connection dropped: no request head within %g s", self.head_timeout)
            self._count("Request Heads Timed Out")
            self.transport.abort()

    def handle_events(self) -> None:
        super().handle_events()
        scope = self.scope
        if scope is not None and scope is not self._timed_scope:
            # A request's head arrived: its deadline is met; the route may abort the connection.
            self._timed_scope = scope
            self._cancel_head_timer()
            extensions: dict[str, Any] = scope.setdefault("extensions", {})  # type: ignore[assignment]
            extensions["pyhv.abort"] = self.transport.abort

    def on_response_complete(self) -> None:
        self._idle_since = self.loop.time()
        if not self.transport.is_closing():
            self._arm_head_timer()  # the next request's head (a keep-alive connection)
        super().on_response_complete()  # (a pipelined request's head stops the timer again)
        if self._eof and (self.cycle is None or self.cycle.response_complete):
            # no request sent before the client's EOF is left to answer
            self._cancel_head_timer()
            self.transport.close()

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio: True keeps it open
        """The client ended its side. A request it sent whole is answered first (True keeps
        the transport open for writing; on_response_complete closes it after the last
        answer); with none, or one it can no longer complete, the connection closes now."""
        cycle = self.cycle
        if (
            cycle is None
            or cycle.response_complete
            or self.conn.their_state not in (h11.DONE, h11.MUST_CLOSE)
        ):
            return False
        self._eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self.transport is None:
            return  # refused at connection_made
        super().connection_lost(exc)
        self._count_open()

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: the API's JSON error, then the connection closes."""
        self._count("Malformed Requests")
        body = json.dumps(
            {"error": f"bad request: {msg} (not HTTP/1.1 as this API speaks it)", "status": 400}
        ).encode()
        event = h11.Response(
            status_code=400,
            headers=[
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
            reason=b"Bad Request",
        )
        try:
            self.transport.write(self.conn.send(event))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            pass  # h11 cannot answer in this state (a response began): just close
        self.transport.close()


def connection_class(
    max_connections: int, head_timeout: float, counters: CounterSet | None, instance: str
) -> type[ApiConnection]:
    """ApiConnection with these limits, counted as `instance` (one class per server)."""
    return type(
        "ApiConnection",
        (ApiConnection,),
        {
            "max_connections": max_connections,
            "head_timeout": head_timeout,
            "counters": counters,
            "instance": instance,
        },
    )
