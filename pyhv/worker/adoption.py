"""A worker's owner, and a new one when it goes away (the worker's side of re-adoption).

The VMMS starts a worker with a connected socket (its owner) and, to let the worker outlive
it, a listening Unix socket it bound in its own run directory (root-only; the path is never
inside the jail: the worker gets the fd) and a secret (in the first message). When the owner's
socket reaches EOF the worker keeps its VM running and waits on the listening socket: a new
owner connects, says :class:`~pyhv.worker.messages.Hello` with the protocol version and the
secret, and gets :class:`~pyhv.worker.messages.Adopted` (what the worker is: its config, run
state, end, latest memory status, the newest serial output from a bounded ring, counters); from
then on everything goes to it. A wrong secret or version is refused (told, counted, closed).

Why a secret on top of the socket's permissions: the worker is untrusted, but whoever connects
gets to command its VM, so the worker checks it is the VMMS that started it (or its successor on
the same state directory, which keeps the secret), not any other root process that finds the
socket. A worker that ends while nobody owns it waits a bounded time (:data:`END_LINGER_S`) for
an owner to tell its end to, then exits (the next VMMS then finds it gone).
"""

from __future__ import annotations

import hmac
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyhv.worker import protocol

if TYPE_CHECKING:
    from pyhv.worker import messages as m

#: Serial output kept for a new owner (bytes, the newest).
SERIAL_RING = 16 << 10
#: How long a worker whose VM ended unowned waits for an owner to tell (seconds).
END_LINGER_S = 600.0
#: How long a connection may take to say hello (seconds).
HELLO_TIMEOUT_S = 5.0


class Owner:
    """The worker's current owner connection (None between owners), the serial ring, and the
    adoption listener. `send` and the switch to a new owner share one lock, so a new owner's
    snapshot and the stream after it neither overlap nor leave a gap."""

    def __init__(
        self, sock: socket.socket, listener: socket.socket | None, secret: str | None
    ) -> None:
        self._sock: socket.socket | None = sock
        self._listener = listener if secret is not None else None
        if listener is not None and secret is None:
            listener.close()  # a direct user: stop on EOF, as before
        self._secret = secret
        self._lock = threading.Lock()
        self._owned = threading.Condition(self._lock)
        self._ring = bytearray()
        self.counters = {"owners": 1, "serial_dropped": 0, "adoptions_refused": 0}
        #: The latest memory status pushed (for the next owner).
        self.memory: Any = None

    @property
    def adoptable(self) -> bool:
        return self._listener is not None

    def send(self, msg: m._Event) -> None:
        with self._lock:
            self._send_locked(msg)

    def _send_locked(self, msg: m._Event) -> None:
        if self._sock is None:
            return
        try:
            protocol.send_message(self._sock, msg)
        except OSError:
            pass  # owner gone: its command loop sees EOF

    def serial(self, data: bytes) -> None:
        """Serial output: into the ring, and to the owner if there is one."""
        from pyhv.worker.messages import SerialOut

        with self._lock:
            self._ring += data
            del self._ring[:-SERIAL_RING]
            if self._sock is None:
                self.counters["serial_dropped"] += len(data)
            self._send_locked(SerialOut(data))

    def memory_status(self, status: Any) -> None:
        from pyhv.worker.messages import MemoryStatusPushed

        with self._lock:
            self.memory = status
            self._send_locked(MemoryStatusPushed(status))

    def lost(self, sock: socket.socket) -> bool:
        """`sock`'s owner went away (EOF): True if the worker waits for a new one (the VM
        runs on), False if it has no listener (the caller stops the VM)."""
        with self._lock:
            if self._sock is sock:
                self._sock = None
        sock.close()
        return self.adoptable

    def wait_owner(self, timeout: float) -> bool:
        """Until someone owns the worker (True), or `timeout` seconds (False)."""
        with self._owned:
            return self._owned.wait_for(lambda: self._sock is not None, timeout)

    def close(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass
            self._listener.close()
            self._listener = None

    # --- adoption ------------------------------------------------------------------------

    def serve_adoptions(
        self,
        describe: Callable[[bytes, dict[str, int], Any], m.Adopted],
        on_owner: Callable[[socket.socket], object],
    ) -> None:
        """Take new owners on the listening socket (a thread of its own): `describe(serial,
        counters, memory)` gives the Adopted answer, `on_owner(sock)` starts serving it."""
        if self._listener is None:
            return
        threading.Thread(
            target=self._accept, args=(describe, on_owner), name="adoption", daemon=True
        ).start()

    def _accept(
        self,
        describe: Callable[[bytes, dict[str, int], Any], m.Adopted],
        on_owner: Callable[[socket.socket], object],
    ) -> None:
        while True:
            listener = self._listener
            if listener is None:
                return
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the worker is ending
            try:
                if self._hello(conn, describe):
                    on_owner(conn)
                    continue
            except OSError:
                pass
            conn.close()

    def _hello(
        self, conn: socket.socket, describe: Callable[[bytes, dict[str, int], Any], m.Adopted]
    ) -> bool:
        from pyhv.worker import messages as msgs

        conn.settimeout(HELLO_TIMEOUT_S)
        try:
            raw = protocol.recv_frame(conn)
            if raw is None:
                return False
            hello = msgs.decode_op(raw)
            if not isinstance(hello, msgs.Hello):
                raise msgs.MessageError(
                    f"a new owner's first message must be 'hello', got {type(hello).__name__}"
                )
            msgs.check_version(hello.protocol, "the new owner")
            assert self._secret is not None
            if not hmac.compare_digest(hello.secret.encode(), self._secret.encode()):
                raise msgs.MessageError(
                    "the adoption secret is wrong: only the VMMS that started this worker (or "
                    "its successor on the same state directory) may adopt it"
                )
        except (protocol.FrameRefused, msgs.MessageError, TimeoutError) as e:
            self._refuse(conn, str(e) or "no hello in time")
            return False
        conn.settimeout(None)
        with self._lock:
            if self._sock is not None and _hung_up(self._sock):
                # The old owner died a moment ago; its command loop has not seen the EOF yet.
                self._sock = None
            if self._sock is not None:
                self._refuse_locked(conn, "this worker has an owner already")
                return False
            self.counters["owners"] += 1
            answer = describe(bytes(self._ring), dict(self.counters), self.memory)
            protocol.send_message(conn, answer)
            self._sock = conn
            self._owned.notify_all()
        print(f"pyhv worker: adopted by a new owner ({answer.state})", file=sys.stderr)
        return True

    def _refuse(self, conn: socket.socket, why: str) -> None:
        with self._lock:
            self._refuse_locked(conn, why)

    def _refuse_locked(self, conn: socket.socket, why: str) -> None:
        from pyhv.worker.messages import Refused

        self.counters["adoptions_refused"] += 1
        print(f"pyhv worker: adoption refused: {why}", file=sys.stderr)
        try:
            protocol.send_message(conn, Refused(why[:65536]))
        except OSError:
            pass


def _hung_up(sock: socket.socket) -> bool:
    """The peer of `sock` has closed it (nothing is read: its reader sees the EOF later)."""
    import select

    p = select.poll()
    p.register(sock, select.POLLHUP | select.POLLRDHUP | select.POLLERR)
    try:
        return any(ev & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, ev in p.poll(0))
    except OSError:
        return True


def listener_from_fd(fd: int) -> socket.socket:
    """The listening socket the owner passed (checked: a listening Unix stream socket)."""
    sock = socket.socket(fileno=fd)
    if (
        sock.family != socket.AF_UNIX
        or sock.type != socket.SOCK_STREAM
        or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    ):
        sock.close()
        raise ValueError(f"fd {fd} is not a listening Unix stream socket")
    os.set_inheritable(fd, False)
    return sock
