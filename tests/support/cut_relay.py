"""A network link that a test can cut: a TCP relay on loopback in front of a destination,
forwarding every connection byte for byte (:class:`CutRelay`)."""

from __future__ import annotations

import socket
import struct
import threading


class CutRelay:
    """Relays each connection made to `address` to `destination`. `cut()` resets every
    connection it carries (both ends see the link die, as when a cable is pulled and the
    routers say so); while `hold()` is on, new connections are accepted but not forwarded
    (a link that is still down) until `release()`. `to_destination` counts the bytes
    forwarded that way."""

    def __init__(self, destination: tuple[str, int]) -> None:
        self.destination = destination
        self.to_destination = 0
        self.connections = 0  #: accepted so far
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        threading.Thread(target=self._accept, name="cut-relay", daemon=True).start()

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def cut(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                _reset(s)

    def close(self) -> None:
        self.cut()
        self._listener.close()
        self._open.set()

    def _accept(self) -> None:
        while True:
            try:
                src, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connect, args=(src,), daemon=True).start()

    def _connect(self, src: socket.socket) -> None:
        self._open.wait()
        try:
            dst = socket.create_connection(self.destination, timeout=30)
        except OSError:
            _reset(src)
            return
        dst.settimeout(None)
        with self._lock:
            self._pairs.append((src, dst))
        threading.Thread(target=self._pump, args=(src, dst, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(dst, src, False), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket, forward: bool) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
                if forward:
                    self.to_destination += len(data)
            b.shutdown(socket.SHUT_WR)  # a closed its side: so does the relay, in order
        except OSError:  # a reset (or cut): passed on
            _reset(a)
            _reset(b)


def _reset(s: socket.socket) -> None:
    """Close with a reset (RST), waking a thread blocked reading it."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
