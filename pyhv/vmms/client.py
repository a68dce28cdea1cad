"""A client of the VMMS API (what `pyhv vm ...` speaks): JSON requests over the Unix socket, or
TCP with a bearer token; the console as a raw byte stream after a connection upgrade."""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import Any

#: The `Upgrade:` token that turns a console request into a raw byte stream.
CONSOLE_PROTOCOL = "pyhv-console"
#: The `Upgrade:` token that turns a trace request into a stream of JSON lines.
TRACE_PROTOCOL = "pyhv-trace"


class ClientError(Exception):
    """The VMMS refused a request (status and its message) or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


class VmmsClient:
    """`socket_path` (Unix) or `tcp` ("127.0.0.1:PORT") with `token`."""

    def __init__(
        self,
        socket_path: Path | None = None,
        tcp: str | None = None,
        token: str | None = None,
        timeout: float = 120.0,
    ) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path and tcp")
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self.timeout = timeout

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(str(self.socket_path), self.timeout)
        assert self.tcp is not None
        host, _, port = self.tcp.rpartition(":")
        return http.client.HTTPConnection(host, int(port), timeout=self.timeout)

    def _where(self) -> str:
        return str(self.socket_path) if self.socket_path is not None else f"tcp {self.tcp}"

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer (or text for non-JSON); ClientError for a 4xx/5xx."""
        headers = self._headers()
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn = self._connection()
        try:
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (FileNotFoundError, ConnectionRefusedError):
            raise ClientError(
                f"no VMMS is serving on {self._where()}: start one with `pyhv vmms serve` "
                "(or pass --state-dir / --socket)"
            ) from None
        except OSError as e:
            raise ClientError(f"talking to the VMMS on {self._where()} failed: {e}") from None
        finally:
            conn.close()
        ctype = resp.getheader("Content-Type", "")
        value: Any = raw.decode("utf-8", "replace")
        if ctype.startswith("application/json") and raw:
            value = json.loads(raw)
        if resp.status >= 400:
            msg = value.get("error") if isinstance(value, dict) else value
            raise ClientError(str(msg), resp.status)
        return value if raw else None

    def console(self, name: str) -> socket.socket:
        """A socket carrying the VM's serial console both ways (recent output first)."""
        return self._upgrade(f"/api/vms/{name}/console", CONSOLE_PROTOCOL, "console")

    def trace(self, name: str, only: Iterable[str] | None = None) -> socket.socket:
        """A socket carrying VM `name`'s flight recorder events (of the kinds `only`, None:
        all), one JSON object a line (pyhv.trace.events), while it stays open; the VMMS
        closes it when the VM ends."""
        query = "" if only is None else "?only=" + ",".join(sorted(only))
        return self._upgrade(f"/api/vms/{name}/trace{query}", TRACE_PROTOCOL, "trace")

    def _upgrade(self, path: str, protocol: str, what: str) -> socket.socket:
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = str(self.socket_path)
        else:
            assert self.tcp is not None
            host, _, port = self.tcp.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (host, int(port))
        try:
            sock.connect(address)
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ClientError(f"no VMMS is serving on {self._where()}") from None
        auth = "".join(f"{k}: {v}\r\n" for k, v in self._headers().items())
        sock.sendall(
            (
                f"POST {path} HTTP/1.1\r\nHost: localhost\r\n"
                f"Connection: Upgrade\r\nUpgrade: {protocol}\r\n{auth}"
                "Content-Length: 0\r\n\r\n"
            ).encode()
        )
        head = bytearray()
        while b"\r\n\r\n" not in head:
            b = sock.recv(1)  # byte by byte: nothing of the stream is read ahead
            if not b:
                sock.close()
                raise ClientError(f"the VMMS closed the {what} connection")
            head += b
        status_line, _, rest = bytes(head).partition(b"\r\n")
        parts = status_line.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        if status != 101:
            # An error answer: read its JSON body for the message.
            length = 0
            for line in rest.split(b"\r\n"):
                k, _, v = line.partition(b":")
                if k.strip().lower() == b"content-length":
                    length = int(v.strip())
            body = bytearray()
            while len(body) < length:
                chunk = sock.recv(length - len(body))
                if not chunk:
                    break
                body += chunk
            sock.close()
            try:
                msg = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                msg = body.decode("utf-8", "replace")
            raise ClientError(str(msg), status)
        return sock
