"""A client of the VMMS API (what `pyhv vm ...` speaks, and what a source VMMS speaks to the
destination of a migration): JSON requests over the Unix socket, or TCP with a bearer token in
the ``Authorization`` header, over TLS when given a CA (and a client certificate when the
server asks for one); the console and the flight recorder as a :class:`Stream` (one request
whose body and answer stay open, chunked both ways)."""

from __future__ import annotations

import http.client
import io
import json
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ClientError(Exception):
    """The VMMS refused a request (status and its message) or could not be reached (status 0)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ClientTls:
    """TLS to a VMMS: the CA its certificate must chain to, and this side's certificate and
    key (for a VMMS that asks for client certificates)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None

    def context(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca))
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if self.cert is not None:
                ctx.load_cert_chain(str(self.cert), str(self.key) if self.key else None)
        except (OSError, ssl.SSLError) as e:
            raise ClientError(f"cannot use the TLS CA, certificate or key: {e}") from None
        return ctx


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
    """`socket_path` (Unix) or `tcp` ("HOST:PORT") with `token`, and `tls` for HTTPS."""

    def __init__(
        self,
        socket_path: Path | None = None,
        tcp: str | None = None,
        token: str | None = None,
        timeout: float = 120.0,
        tls: ClientTls | None = None,
    ) -> None:
        if (socket_path is None) == (tcp is None):
            raise ValueError("give exactly one of socket_path and tcp")
        self.socket_path = socket_path
        self.tcp = tcp
        self.token = token
        self.timeout = timeout
        self.tls = tls
        self._ssl = tls.context() if tls is not None else None

    def _host_port(self) -> tuple[str, int]:
        assert self.tcp is not None
        host, _, port = self.tcp.rpartition(":")
        return host.strip("[]"), int(port)

    def _connection(self) -> http.client.HTTPConnection:
        if self.socket_path is not None:
            return _UnixConnection(str(self.socket_path), self.timeout)
        host, port = self._host_port()
        if self._ssl is not None:
            return http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._ssl)
        return http.client.HTTPConnection(host, port, timeout=self.timeout)

    def _where(self) -> str:
        if self.socket_path is not None:
            return str(self.socket_path)
        return f"{'https' if self._ssl else 'tcp'} {self.tcp}"

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
        except ssl.SSLError as e:
            raise ClientError(f"TLS with the VMMS on {self._where()} failed: {e}") from None
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

    def console(self, name: str) -> Stream:
        """The VM's serial console both ways (recent output first), until the VM ends."""
        return self._stream(f"/api/vms/{name}/console", "console")

    def trace(self, name: str, only: Iterable[str] | None = None) -> Stream:
        """VM `name`'s flight recorder events (of the kinds `only`, None: all), one JSON
        object a line (pyhv.trace.events), while it stays open; the VMMS ends it when the VM
        ends."""
        query = "" if only is None else "?only=" + ",".join(sorted(only))
        return self._stream(f"/api/vms/{name}/trace{query}", "trace")

    def _stream(self, path: str, what: str) -> Stream:
        if self.socket_path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: Any = str(self.socket_path)
        else:
            host, port = self._host_port()
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
            address = (host, port)
        sock.settimeout(self.timeout)
        try:
            sock.connect(address)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=address[0])
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            raise ClientError(f"no VMMS is serving on {self._where()}") from None
        except (OSError, ssl.SSLError) as e:
            sock.close()
            raise ClientError(f"connecting to the VMMS on {self._where()} failed: {e}") from None
        auth = "".join(f"{k}: {v}\r\n" for k, v in self._headers().items())
        try:
            sock.sendall(
                (
                    f"POST {path} HTTP/1.1\r\nHost: localhost\r\n{auth}"
                    "Content-Type: application/octet-stream\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode()
            )
            stream = Stream(sock)
            status, headers = stream._read_head()
        except OSError as e:
            sock.close()
            raise ClientError(f"the VMMS closed the {what} connection: {e}") from None
        if status != 200:
            length = int(headers.get("content-length", "0") or 0)
            body = stream._read_exactly(length) if length else b""
            sock.close()
            try:
                msg = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                msg = body.decode("utf-8", "replace")
            raise ClientError(str(msg), status)
        sock.settimeout(None)
        return stream


class Stream:
    """A console or trace connection: `sendall` sends bytes (one chunk of the request's body),
    `recv` gives what the VMMS sent (b"" at its end). Socket-like enough for select()
    (`fileno`, and `pending` bytes already read), `settimeout` and `makefile("rb")`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()  # raw bytes read, not yet decoded
        self._data = bytearray()  # decoded bytes not yet returned
        self._left = 0  # bytes left in the current chunk
        self._ended = False

    # --- the socket's side ---------------------------------------------------------------

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self._buf += chunk
        return True

    def _read_line(self) -> bytes:
        while b"\r\n" not in self._buf:
            if len(self._buf) > 8192:
                raise OSError("a line of the answer is too long")
            if not self._fill():
                raise OSError("the connection closed")
        line, _, rest = bytes(self._buf).partition(b"\r\n")
        self._buf = bytearray(rest)
        return line

    def _read_exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not self._fill():
                break
        out, self._buf = bytes(self._buf[:n]), self._buf[n:]
        return out

    def _read_head(self) -> tuple[int, dict[str, str]]:
        parts = self._read_line().split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers: dict[str, str] = {}
        while line := self._read_line():
            k, _, v = line.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        return status, headers

    def _decode(self) -> None:
        """Decode what was read into _data (up to the last whole chunk header)."""
        while self._buf and not self._ended:
            if self._left == 0:
                if b"\r\n" not in self._buf:
                    return
                line, _, rest = bytes(self._buf).partition(b"\r\n")
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError:
                    raise OSError(f"the VMMS sent a bad chunk size {line[:20]!r}") from None
                if size == 0:
                    self._ended = True
                    return
                self._buf = bytearray(rest)
                self._left = size + 2  # the chunk and its CRLF
            take = min(self._left, len(self._buf))
            piece = bytes(self._buf[:take])
            self._buf = self._buf[take:]
            self._left -= take
            crlf = min(take, max(0, 2 - self._left))  # of the chunk's trailing CRLF
            piece = piece[: take - crlf]
            self._data += piece

    # --- the caller's side ---------------------------------------------------------------

    def recv(self, n: int = 65536) -> bytes:
        """Up to `n` bytes the VMMS sent; b"" at the end (the VM ended, or the VMMS closed)."""
        while True:
            self._decode()
            if self._data:
                out, self._data = bytes(self._data[:n]), self._data[n:]
                return out
            if self._ended or not self._fill():
                self._ended = True
                return b""

    def pending(self) -> int:
        """Bytes already read that recv returns without waiting."""
        self._decode()
        return len(self._data)

    def sendall(self, data: bytes) -> None:
        if data:
            self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def fileno(self) -> int:
        return self.sock.fileno()

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        if mode != "rb":
            raise ValueError("a stream reads as bytes: makefile('rb')")
        return io.BufferedReader(_StreamReader(self))

    def close(self, timeout: float = 5.0) -> None:
        """End the stream: say the input ended (what was sent is typed first), let the VMMS
        end its answer (up to `timeout`), then close."""
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(b"0\r\n\r\n")
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.sock.recv(65536):
                pass
        except OSError:
            pass  # the VMMS has gone or dropped us already
        finally:
            try:
                self.sock.close()
            except OSError:
                pass

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _StreamReader(io.RawIOBase):
    def __init__(self, stream: Stream) -> None:
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._stream.recv(len(b))
        b[: len(data)] = data
        return len(data)
