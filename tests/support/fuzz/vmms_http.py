"""Fuzz target of the VMMS's HTTP server as a client before authentication reaches it: whole
requests as raw bytes on a live `pyhv vmms serve` Unix socket. It speaks only bytes on the
socket, so it fuzzes whatever server the VMMS runs. A crash is an answer 500 (a bug that the
server caught), a connection the server neither answers nor closes within the time limit, or
the server process gone; after a run the server must still answer a valid request.

Requests that would start or migrate a VM are not sent (they would run guests): the target
fuzzes the server's parsing, not the VMs behind it."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from pathlib import Path

from tests.support.fuzz import Target

#: Seconds the server has to answer (or close) one request.
ANSWER_TIME = 10.0
#: Routes that would start guests or move VMs between hosts.
_ACTIONS = re.compile(rb"(?i)s\W*t\W*a\W*r\W*t|migra|incoming|resolve|%")


class ServerCrash(AssertionError):
    """The server answered 500, did not answer, or is gone."""


def request(method: str, path: str, body: object | None = None, extra: str = "") -> bytes:
    raw = b"" if body is None else json.dumps(body).encode()
    head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n"
    return head.encode() + b"\r\n" + raw


def send(path: Path, data: bytes, timeout: float = ANSWER_TIME) -> bytes:
    """Send `data`, end our side, and read the answer until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (or closed) before it read everything: allowed
        out = bytearray()
        try:
            while chunk := s.recv(65536):
                out += chunk
                if len(out) > 1 << 20:
                    break
        except ConnectionResetError:
            pass
        except TimeoutError:
            raise ServerCrash(f"no answer and no close within {timeout} s") from None
        return bytes(out)


def status_of(answer: bytes) -> int | None:
    m = re.match(rb"HTTP/1\.[01] (\d{3})", answer)
    return int(m[1]) if m else None


def seeds() -> list[bytes]:
    settings = {"name": "fz", "memory": "512M", "dynamic_memory": True, "weight": 60}
    return [
        request("GET", "/api/host"),
        request("GET", "/api/vms"),
        request("GET", "/openapi.json"),
        request("POST", "/api/vms", settings),
        request("PATCH", "/api/vms/fz", {"weight": 70, "buffer": 20}),
        request("POST", "/api/vms/fz/memory", {"target": "768M"}),
        request("GET", "/api/vms/fz/memory"),
        request("DELETE", "/api/vms/fz"),
        request("GET", "/api/vms?x=1", extra="Accept: application/json\r\nX-A: b\r\n"),
        request("POST", "/api/vms", settings).replace(
            b"Connection: close", b"Connection: keep-alive"
        )
        + request("GET", "/api/host"),
    ]


def target(sock: Path, alive: Callable[[], bool]) -> Target:
    """The target against the server at `sock`; `alive()` says whether its process runs."""

    def run(data: bytes) -> None:
        if _ACTIONS.search(data):
            return
        try:
            answer = send(sock, data)
        except OSError as e:
            if not alive():
                raise ServerCrash(f"the server is gone: {e}") from None
            raise ServerCrash(f"cannot talk to the server: {e}") from None
        if status_of(answer) == 500:
            raise ServerCrash(f"answered 500: {answer[:600]!r}")
        if not alive():
            raise ServerCrash("the server process exited")

    return Target(
        "vmms.http",
        "whole HTTP requests as raw bytes on a live VMMS Unix socket",
        seeds,
        run,
        (),
        max_size=16384,
        needs="vmms",
    )


def still_answers(sock: Path) -> None:
    """The server answers a valid request with 200 (after a fuzz run)."""
    answer = send(sock, request("GET", "/api/host"))
    if status_of(answer) != 200:
        raise ServerCrash(f"a valid request got {answer[:300]!r}")
