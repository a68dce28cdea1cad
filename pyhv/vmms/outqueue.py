"""Output waiting for one console client, bounded in bytes: a client that does not read is
dropped when its backlog passes the bound, so it never pins the VMMS's memory (issue 11,
finding 8)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable


class BoundedOutput:
    """Bytes from a VM's serial port (any thread) to the client's writer thread. `put(b"")`
    ends the stream; past `limit` bytes waiting, everything waiting is let go, `overflowed`
    is set and `on_overflow` runs once (it drops the client)."""

    def __init__(self, limit: int, on_overflow: Callable[[], None]) -> None:
        self.limit = limit
        self._on_overflow = on_overflow
        self._chunks: deque[bytes] = deque()
        self.size = 0  # bytes waiting
        self.overflowed = False
        self._ended = False
        self._cond = threading.Condition()

    def put(self, data: bytes) -> None:
        with self._cond:
            if self.overflowed or self._ended:
                return
            if not data:
                self._ended = True
            elif self.size + len(data) > self.limit:
                self.overflowed = True
                self._chunks.clear()
                self.size = 0
            else:
                self._chunks.append(data)
                self.size += len(data)
            self._cond.notify()
            overflowed = self.overflowed
        if overflowed:
            self._on_overflow()

    @property
    def ended(self) -> bool:
        """The stream's end was put (what waits may still be taken)."""
        return self._ended

    def take(self) -> bytes | None:
        """What waits, joined, without waiting (b"" if nothing does); None once overflowed.
        For a reader woken by an event of its own (the API's event loop)."""
        with self._cond:
            if self.overflowed:
                return None
            data = b"".join(self._chunks)
            self._chunks.clear()
            self.size = 0
            return data

    def get(self) -> bytes | None:
        """What waits, joined (blocks until there is some); b"" at the end, None once
        overflowed."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._chunks) or self._ended or self.overflowed)
            if self.overflowed:
                return None
            data = b"".join(self._chunks)
            self._chunks.clear()
            self.size = 0
            return data
