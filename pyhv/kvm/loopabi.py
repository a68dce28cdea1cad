"""What the C run loop (``_runloop.c``) reads and writes, declared here, filled by the layer above.

The C loop handles port I/O, MMIO, RDMSR and WRMSR exits without the interpreter in between, so it
reads and writes Python objects at fixed places: the `__slots__` of the classes below, found once
from their member descriptors. The hypervisor layer (pyhv.hypervisor) fills them: its intercept
table is a `Routes`, its entries `Route`s, its intercept messages and its VPs derive from
`IoAccess`/`MmioAccess`/`MsrAccess` and `LoopOwner`. The C loop reads nothing else of theirs,
and calls back only the three `LoopOwner` methods. Adding slots in a subclass is fine; renaming
one here needs the same change in ``_runloop.c``.
"""

from __future__ import annotations

from typing import Any

# Indexes of the per-VP counter arrays (array('q')) the C loop adds to in place.
KIND_IO = 0
KIND_MEMORY = 1
KIND_MSR = 2


class LoopOwner:
    """The object a run loop belongs to (a VP): two flags the loop reads after every handler,
    and the three calls it makes back into Python."""

    __slots__ = ("_attention", "_touched")

    def __init__(self) -> None:
        self._attention = False  # the loop must stop and look at the owner's requests
        self._touched = False  # a handler read or changed VP state during this exit

    def _flush_exit_changes(self) -> None:
        """Called when `_touched` is set after a handler: write back what it changed."""
        raise NotImplementedError

    def _handler_failed(self, kind: int, what: str, e: BaseException) -> BaseException:
        """A handler raised `e`: the exception that ends the loop (raised `from None`)."""
        raise NotImplementedError

    def _fill_io_read(self, result: Any, off: int, size: int, count: int, port: int) -> None:
        """Store an I/O read handler's result that is not a plain int (bytes, int subclasses)."""
        raise NotImplementedError


class Route:
    """Where one intercepted port, MSR or GPA range goes: the handler, and which accesses."""

    __slots__ = ("handler", "read", "write")

    def __init__(self, handler: Any, read: bool, write: bool) -> None:
        self.handler = handler
        self.read = read
        self.write = write


class GpaRoute(Route):
    """A `Route` for the GPA range [start, end)."""

    __slots__ = ("start", "end")

    def __init__(self, handler: Any, read: bool, write: bool, start: int, end: int) -> None:
        super().__init__(handler, read, write)
        self.start = start
        self.end = end


class Routes:
    """The routes a VP's loop looks up. Replaced, never changed in place, while a loop runs:
    `io` a list of 0x10000 `Route | None` (one per port); `gpa` a tuple of `GpaRoute`s sorted by
    start, `gpa_starts` their starts; `msr` a dict MSR index -> `Route`."""

    __slots__ = ("io", "gpa", "gpa_starts", "msr")

    def __init__(self) -> None:
        self.io: list[Any] = [None] * 0x10000
        self.gpa: tuple[Any, ...] = ()
        self.gpa_starts: tuple[int, ...] = ()
        self.msr: dict[int, Any] = {}


class IoAccess:
    """A port access as the loop hands it to a handler (one object per VP, filled per exit)."""

    __slots__ = ("access_type", "port", "access_size", "count", "value")


class MmioAccess:
    """An MMIO access as the loop hands it to a handler (one object per VP, filled per exit)."""

    __slots__ = ("access_type", "gpa", "gva", "access_size", "value")


class MsrAccess:
    """An RDMSR/WRMSR as the loop hands it to a handler; the handler may set `gp` (#GP)."""

    __slots__ = ("access_type", "msr", "value", "gp")
