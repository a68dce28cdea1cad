"""Recovery of a cut post-copy link (QEMU's postcopy-recover).

Once the source committed a post-copy, the VM runs at the destination with part of its memory
still at the source; losing the connection then must not lose the VM. Both sides keep what
they hold: the destination its guest RAM registered with userfaultfd (a VP touching a missing
page waits, the others run on) and the source its paused copy with every page. The source
reconnects to the same address with a new handshake (stream v2: X25519 + HKDF, the same
migration token; pyhv.migration.stream) and sends RESUME naming the migration (the id it sent
in POSTCOPY); the destination answers with the pages it still lacks (MISSING runs, exact: it
knows what it installed), RESUME_ACK, and the requests its waiters have outstanding (REQUEST);
the source serves those first and pushes the rest, as before.

The destination listens on the migration's address again for the whole post-copy
(:class:`ResumeListener`). A connection that fails the handshake, names another migration,
comes while the source is connected or while another resume is in progress is refused (ABORT
with the reason), logged and counted (`resumes_refused`, in POSTCOPY_DONE). A source that does
not come back within the owner's `recover_timeout` stops the VM there, saying so.
"""

from __future__ import annotations

import logging
import secrets
import socket
import threading
import time
from collections.abc import Callable

from pyhv.migration import frames
from pyhv.migration.stream import (
    Frame,
    FrameSocket,
    MigrationError,
    PeerAborted,
    authenticate_destination,
    authenticate_source,
    unpack_zero_runs,
)

log = logging.getLogger("pyhv.migration")

#: Seconds a destination waits for its source to come back after the link was cut (the
#: owner's `recover_timeout`: `pyhv migrate listen --recover-timeout`, Incoming's option).
RECOVER_TIMEOUT = 60.0
#: A cut link is noticed within about this long even when no packet says so (no RST, no FIN):
#: TCP keepalive probes and TCP_USER_TIMEOUT on both ends of a post-copy link.
LINK_DEAD_AFTER = 10
#: Connections a destination handshakes with at once during a post-copy (the source needs two:
#: its link and its urgent channel); more are refused at once, unread (a flood costs nothing).
MAX_PENDING = 4
_TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


def new_migration_id() -> str:
    return secrets.token_hex(16)


def link_options(sock: socket.socket) -> None:
    """A post-copy link may idle between requests: no read timeout, but a dead peer is found
    by keepalive probes (and unacknowledged data by TCP_USER_TIMEOUT) within LINK_DEAD_AFTER."""
    sock.settimeout(None)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 4)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 2)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, LINK_DEAD_AFTER * 1000)


# --- the source -----------------------------------------------------------------------------


def reconnect_source(
    address: tuple[str, int],
    token: bytes,
    migration: str,
    *,
    encrypt: bool,
    bandwidth: int,
    timeout: float,
    max_runs: int,
) -> tuple[FrameSocket, list[tuple[int, int]], frames.ResumeAck]:
    """One attempt: connect, authenticate, RESUME `migration`; returns the new stream, the
    destination's MISSING runs (unchecked: the caller checks them against RAM) and its
    RESUME_ACK. MigrationError (PeerAborted: refused) or OSError otherwise."""
    sock = socket.create_connection(address, timeout=timeout)
    fs = FrameSocket(sock, bandwidth=bandwidth, timeout=timeout, peer="destination")
    try:
        authenticate_source(fs, token, encrypt)
        fs.send_json(Frame.RESUME, frames.Resume(migration))
        runs: list[tuple[int, int]] = []
        while True:
            ftype, _flags, _count, _addr, payload = fs.recv()
            if ftype is Frame.MISSING:
                total = len(runs) + len(payload) // 16  # counted before they are unpacked
                if total > max_runs:
                    raise MigrationError(
                        f"the destination says it misses more runs ({total}) than RAM "
                        f"has pages ({max_runs})",
                        "recover",
                    )
                runs += unpack_zero_runs(payload)
            elif ftype is Frame.RESUME_ACK:
                ack = frames.decode(payload, frames.ResumeAck, "RESUME_ACK")
                if ack.runs != len(runs) or ack.pages != sum(n for _g, n in runs):
                    raise MigrationError(
                        f"RESUME_ACK counts {ack.runs} runs of {ack.pages} pages, the MISSING "
                        f"frames {len(runs)} of {sum(n for _g, n in runs)}",
                        "recover",
                    )
                return fs, runs, ack
            else:
                raise MigrationError(f"expected MISSING or RESUME_ACK, got {ftype.name}", "recover")
    except frames.FrameError as e:
        fs.close(reset=True)
        raise MigrationError(str(e), "recover") from None
    except BaseException:
        fs.close(reset=True)
        raise


def connect_urgent(
    address: tuple[str, int], token: bytes, migration: str, *, encrypt: bool, timeout: float
) -> FrameSocket:
    """The urgent channel of post-copy (QEMU's postcopy-preempt): a second connection to
    the migration's address, authenticated like the first (its own handshake, the same
    token), joined to the migration by PREEMPT naming it. No answer: a destination that
    refuses it sends ABORT (read by whoever reads the channel next)."""
    sock = socket.create_connection(address, timeout=timeout)
    fs = FrameSocket(sock, timeout=timeout, peer="destination")
    try:
        authenticate_source(fs, token, encrypt)
        fs.send_json(Frame.PREEMPT, frames.Resume(migration))
    except BaseException:
        fs.close(reset=True)
        raise
    return fs


def retry_until(
    deadline: float, attempt: Callable[[], object], why: str, pause: float = 0.25
) -> object:
    """`attempt()` until it returns (or the deadline passes: MigrationError saying `why` and
    the last error). Refusals and connection errors alike are retried: a destination that has
    not noticed the cut yet refuses a second source, and one that re-listens is briefly not
    there."""
    tries = 0
    while True:
        tries += 1
        try:
            return attempt()
        except (OSError, MigrationError) as e:
            if time.monotonic() + pause > deadline:
                raise MigrationError(
                    f"{why}, and it could not be restored in {tries} attempts (last: {e})"
                    if why
                    else f"{tries} attempts failed (last: {e})",
                    "recover",
                ) from None
            if why and (tries == 1 or tries % 20 == 0):
                log.warning("post-copy: reconnecting to the destination: %s", e)
            time.sleep(pause)


# --- the destination ------------------------------------------------------------------------


class ResumeListener:
    """Listens on the migration's address during a post-copy, for the source coming back.
    `take(fs)` is called with an authenticated stream whose RESUME named this migration; it
    returns a refusal reason or None (the stream is then the new link)."""

    def __init__(
        self,
        address: tuple[str, int],
        token: bytes,
        migration: str,
        take: Callable[[FrameSocket], str | None],
        attach: Callable[[FrameSocket], str | None],
        timeout: float,
        encrypt: bool = False,
    ) -> None:
        self.token = token
        self.migration = migration
        self.take = take
        self.attach = attach
        self.encrypt = encrypt  #: the migration's mode: a new connection must keep it
        self.timeout = timeout
        self.refused = 0
        self._count = threading.Lock()
        self._slots = threading.BoundedSemaphore(MAX_PENDING)
        self._stop = threading.Event()
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.create_server(address, family=family, backlog=4)  # SO_REUSEADDR
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, name="postcopy-resume", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            fs = FrameSocket(conn, timeout=self.timeout, peer="source")
            if not self._slots.acquire(blocking=False):
                self._refuse(fs, peer, f"{MAX_PENDING} connections are being checked already")
                continue
            threading.Thread(
                target=self._serve, args=(fs, peer), name="postcopy-resume-peer", daemon=True
            ).start()

    def _serve(self, fs: FrameSocket, peer: str) -> None:
        try:
            self._check(fs, peer)
        finally:
            self._slots.release()

    def _check(self, fs: FrameSocket, peer: str) -> None:
        try:
            authenticate_destination(fs, self.token)
            ftype, _flags, _count, _addr, payload = fs.recv()
            if fs.encrypted != self.encrypt:  # refused in answer to its first frame
                raise MigrationError(
                    "the migration is "
                    + ("encrypted, this connection is not" if self.encrypt else "not encrypted"),
                    "recover",
                )
            if ftype not in (Frame.RESUME, Frame.PREEMPT):
                raise MigrationError(f"it sent {ftype.name}, not RESUME or PREEMPT", "recover")
            body = frames.decode(payload, frames.Resume, ftype.name)
            if body.migration != self.migration:
                why = f"it names migration {body.migration}, not the one in post-copy here"
            else:
                why = (self.take if ftype is Frame.RESUME else self.attach)(fs) or ""
                if not why:
                    if ftype is Frame.RESUME:
                        log.warning("post-copy: the source came back from %s: resumed", peer)
                    return
        except PeerAborted:
            why = "it gave up during the handshake"
        except (OSError, MigrationError, frames.FrameError) as e:
            why = str(e)
        self._refuse(fs, peer, why)

    def _refuse(self, fs: FrameSocket, peer: str, why: str) -> None:
        with self._count:
            self.refused += 1
        log.warning("post-copy: a resume from %s is refused: %s", peer, why)
        fs.abort(f"resume refused: {why}")
        fs.close(reset=True)

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.close()
        except OSError:
            pass
