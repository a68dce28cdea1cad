"""The worker's side of the flight recorder stream: while the owner asks for it
(the declared ``Trace`` op of pyhv.worker.messages), the VM's events of those kinds (only
their sources are on) go to the owner in batches
(``TraceEvents``) from a thread of their own, through a bounded queue: if
the owner does not keep up, events are dropped and counted (a "dropped" event), the VP never
waits and the worker's memory never grows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pyhv.trace.events import KINDS, Event
from pyhv.trace.recorder import LINGER, BoundedStream
from pyhv.worker.messages import TraceEvents

#: Events the worker holds for a slow owner before it drops them.
STREAM_LIMIT = 8192
#: Events per message (at ~150 bytes each, a message stays below protocol.MAX_MESSAGE).
BATCH = 2048


def kinds_from_wire(raw: object) -> frozenset[str] | None:
    """The `kinds` of a trace op (None: all); unknown kinds are ignored (the owner checked)."""
    if not isinstance(raw, list):
        return None
    return frozenset(k for k in raw if isinstance(k, str) and k in KINDS)


class TraceStream:
    """Streams one VM's recorder to the owner while `set(True)`."""

    def __init__(self, vm: Any, send: Callable[[Any], None]) -> None:
        self._vm = vm
        self._recorder = vm.recorder
        self._send = send
        self._kinds: frozenset[str] | None = None
        self._stream: BoundedStream | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._pump_thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def set(self, on: bool, kinds: frozenset[str] | None = None) -> None:
        with self._lock:
            if on:
                self._kinds = kinds
                self._vm.set_trace_kinds(kinds)
            if on and self._stream is None:
                stream = self._stream = BoundedStream(STREAM_LIMIT)
                self._pump_thread = threading.Thread(
                    target=self._pump, args=(stream,), name="trace-stream", daemon=True
                )
                self._pump_thread.start()
                self._unsubscribe = self._recorder.subscribe(self._filter(stream))
            elif not on and self._stream is not None:
                assert self._unsubscribe is not None
                self._unsubscribe()
                self._stream.close()  # the pump sends what is left, then ends
                self._stream = self._unsubscribe = None

    def _filter(self, stream: BoundedStream) -> Callable[[Event], None]:
        put = stream.put

        def wanted(e: Event) -> None:
            kinds = self._kinds
            if kinds is None or e.kind in kinds:
                put(e)

        return wanted

    def close(self, timeout: float = 5.0) -> None:
        """Stop, after sending every event recorded so far (before the VM's end report)."""
        self.set(False)
        if self._pump_thread is not None:
            self._pump_thread.join(timeout)

    def _pump(self, stream: BoundedStream) -> None:
        while True:
            events = stream.take(most=BATCH)
            if events is None:
                return
            if events:
                self._send(TraceEvents([e.to_wire() for e in events]))
            if len(events) < BATCH:
                time.sleep(LINGER)  # let the next batch grow: fewer wake-ups of the VP threads
