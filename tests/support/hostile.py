"""What a hostile peer may send a decoder: any JSON value (for hypothesis); and a man in the
middle of a migration stream (:class:`StreamRelay`)."""

from __future__ import annotations

import socket
import threading

from hypothesis import strategies as st

from pyhv.migration import stream as ms


def json_values(keys: st.SearchStrategy[str] | None = None) -> st.SearchStrategy[object]:
    """Any JSON value: null, booleans, integers beyond 64 bits, floats, text, and lists and
    objects of those (object keys drawn from `keys`, any short text by default)."""
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(min_value=-(1 << 80), max_value=1 << 80)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=16),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(keys if keys is not None else st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=12,
    )


class StreamRelay:
    """A man in the middle of one migration stream: a TCP proxy on loopback between a source
    and `destination` that forwards frame by frame, keeps every byte it forwards (`seen`, per
    direction), and with `tamper` = (direction, frame type) flips one payload byte of the first
    such frame after the handshake, as an attacker on the path would: the old xxh3 check
    recomputed over the altered bytes and put in the header (`recompute_check`), since that
    is all the stream checked before it was sealed. Directions: "to_destination",
    "to_source". With `connections` > 1 it relays that many connections (a migration's data
    streams, each sealed from its first frame, JOIN), and `tamper_connection` says which one to
    tamper with (0: the first)."""

    #: the frame after which each direction is sealed (a 16-byte tag follows each payload)
    _SEALED_AFTER = {"to_destination": ms.Frame.AUTH, "to_source": ms.Frame.AUTH_OK}

    def __init__(
        self,
        destination: tuple[str, int],
        tamper: tuple[str, ms.Frame] | None = None,
        recompute_check: bool = True,
        connections: int = 1,
        tamper_connection: int = 0,
    ) -> None:
        self.connections = connections
        self.tamper_connection = tamper_connection
        self.destination = destination
        self.tamper = tamper
        self.recompute_check = recompute_check
        self.seen = {"to_destination": bytearray(), "to_source": bytearray()}
        self.tampered = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._socks: list[socket.socket] = [self._listener]
        self._thread = threading.Thread(target=self._accept, name="relay", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        for i in range(self.connections):
            try:
                self._listener.settimeout(60)
                src, _ = self._listener.accept()
                dst = socket.create_connection(self.destination, timeout=60)
            except OSError:
                return
            self._socks += [src, dst]
            for a, b, d in ((src, dst, "to_destination"), (dst, src, "to_source")):
                threading.Thread(target=self._pump, args=(a, b, d, i), daemon=True).start()

    @staticmethod
    def _read(sock: socket.socket, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            got = sock.recv(n - len(buf))
            if not got:
                return None
            buf += got
        return bytes(buf)

    def _pump(self, a: socket.socket, b: socket.socket, direction: str, conn: int = 0) -> None:
        sealed = False
        try:
            while True:
                head = self._read(a, ms.HEADER.size)
                if head is None:
                    break
                ftype, flags, res, seq, length, count, addr, check = ms.HEADER.unpack(head)
                sealed = sealed or ftype == ms.Frame.JOIN  # a data stream: sealed from JOIN on
                body = self._read(a, length + (ms.TAG if sealed else 0))
                if body is None:
                    break
                if (
                    sealed
                    and self.tamper == (direction, ftype)
                    and conn == self.tamper_connection
                    and length
                    and not self.tampered.is_set()
                ):
                    forged = bytearray(body)
                    forged[length // 2] ^= 0x40
                    body = bytes(forged)
                    if self.recompute_check:
                        fields = ms.HEADER.unpack(head)[:-1]
                        check = ms._check(ms._HEAD_NO_CHECK.pack(*fields), body[:length])
                        head = ms.HEADER.pack(*fields, check)
                    self.tampered.set()
                self.seen[direction] += head + body
                b.sendall(head + body)
                if ftype == self._SEALED_AFTER[direction]:
                    sealed = True
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        for s in self._socks:
            s.close()
