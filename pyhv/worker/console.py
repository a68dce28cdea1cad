"""The host end of a VM's serial port: everything the guest printed, searchable, plus waiting
for a marker such as the shell prompt (what `pyhv run --script` and the tests drive)."""

from __future__ import annotations

import threading
import time


class ConsoleClosed(EOFError):
    """The VM ended while waiting for its output."""


class SerialLog:
    """Append-only record of the guest's serial output with a read cursor for expect()."""

    def __init__(self, limit: int = 16 << 20) -> None:
        self._buf = bytearray()
        self._cursor = 0
        self._limit = limit
        self._cond = threading.Condition()
        self._closed = False
        self.first_byte_at: float | None = None

    def append(self, data: bytes) -> None:
        with self._cond:
            if self.first_byte_at is None:
                self.first_byte_at = time.perf_counter()
            self._buf += data
            if len(self._buf) > self._limit:
                # Keep the tail: a guest printing forever must not eat the host's memory.
                drop = len(self._buf) - self._limit
                del self._buf[:drop]
                self._cursor = max(0, self._cursor - drop)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def read_until(self, marker: bytes, timeout: float) -> bytes:
        """Output from the cursor through the next ``marker``; moves the cursor past it.
        Raises TimeoutError or ConsoleClosed (with what arrived) when it does not come."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                i = self._buf.find(marker, self._cursor)
                if i >= 0:
                    end = i + len(marker)
                    out = bytes(self._buf[self._cursor : end])
                    self._cursor = end
                    return out
                if self._closed:
                    raise ConsoleClosed(
                        f"the VM ended before {marker!r} appeared; last output: "
                        f"{bytes(self._buf[-200:])!r}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{marker!r} did not appear within {timeout:g} s; last output: "
                        f"{bytes(self._buf[-200:])!r}"
                    )
                self._cond.wait(left)

    def read_available(self) -> bytes:
        """Everything after the cursor; moves the cursor to the end."""
        with self._cond:
            out = bytes(self._buf[self._cursor :])
            self._cursor = len(self._buf)
            return out
