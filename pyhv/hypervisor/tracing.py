"""Traced intercept handlers: what the flight recorder puts between a run loop and a handler.

Tracing costs nothing while it is off because nothing on the exit path knows about it: the
intercept table swaps each route's handler for one of these wrappers when a recorder attaches
(InterceptTable.set_tracer) and swaps the plain handler back when it leaves. The wrapper times
the handler and records one typed event (pyhv.trace.events) after it returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pyhv.trace.events import Event, IoEvent, MmioEvent, MsrEvent

Record = Callable[[Event], object]
Handler = Callable[[Any], Any]

_WRITE = 1  # AccessType.WRITE


def _read_value(result: Any, size: int) -> int:
    """What a read handler answered, as the int the guest sees (first element for strings)."""
    if isinstance(result, int):
        return result & ((1 << (8 * size)) - 1)
    if isinstance(result, bytes | bytearray | memoryview):
        return int.from_bytes(bytes(result)[:size], "little")
    return 0


def _traced(
    handler: Handler, record: Record, event: Callable[[float, Any, Any, int], Event]
) -> Handler:
    """`handler`, timed: after it returns, `event(time, message, result, handler_ns)` is recorded."""
    perf, now = time.perf_counter_ns, time.time

    def traced(m: Any) -> Any:
        t0 = perf()
        r = handler(m)
        ns = perf() - t0
        record(event(now(), m, r, ns))
        return r

    return traced


def traced_io(handler: Handler, record: Record) -> Handler:
    def event(t: float, m: Any, r: Any, ns: int) -> Event:
        w = m.access_type == _WRITE
        value = m.value if w else _read_value(r, m.access_size)
        io = "out" if w else "in"
        return IoEvent(t, m.vp_index, m.port, io, m.access_size, m.count, value, ns)

    return _traced(handler, record, event)


def traced_mmio(handler: Handler, record: Record) -> Handler:
    def event(t: float, m: Any, r: Any, ns: int) -> Event:
        w = m.access_type == _WRITE
        value = m.value if w else _read_value(r, m.access_size)
        return MmioEvent(t, m.vp_index, m.gpa, "write" if w else "read", m.access_size, value, ns)

    return _traced(handler, record, event)


def traced_msr(handler: Handler, record: Record) -> Handler:
    def event(t: float, m: Any, r: Any, ns: int) -> Event:
        w = m.access_type == _WRITE
        value = m.value if w else (0 if m.gp else _read_value(r, 8))
        return MsrEvent(t, m.vp_index, m.msr, "write" if w else "read", value, m.gp, ns)

    return _traced(handler, record, event)
