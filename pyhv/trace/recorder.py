"""One VM's flight recorder: a bounded ring of the latest events and the subscribers that see
each event as it is recorded. The VM turns its event sources on when the first subscriber
attaches and off when the last one leaves (`on_active`), so with nobody watching no source
emits anything and nothing is recorded.

A subscriber that may fall behind reads through a `BoundedStream`: it keeps at most `limit`
events, counts the ones it had to drop and reports them as one `DroppedEvent`; memory never
grows with a slow reader.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from pyhv.trace.events import DroppedEvent, Event

DEFAULT_CAPACITY = 4096
#: Seconds a stream's reader waits after a batch shorter than it asked for.
LINGER = 0.01


class Recorder:
    """The ring of one VM; `record` is called from any thread (VP threads, VSPs, the loop)."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        on_active: Callable[[bool], object] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"a recorder of {capacity} events keeps nothing: give 1 or more")
        self.ring: deque[Event] = deque(maxlen=capacity)
        # events recorded since the recorder was made (no lock: VPs recording at the same
        # instant may each count once for two; the ring and subscribers see every event)
        self.recorded = 0
        self._subscribers: tuple[Callable[[Event], object], ...] = ()
        self._lock = threading.Lock()
        self._on_active = on_active

    @property
    def active(self) -> bool:
        return bool(self._subscribers)

    def record(self, event: Event) -> None:
        self.ring.append(event)
        self.recorded += 1
        for s in self._subscribers:
            s(event)

    def subscribe(self, fn: Callable[[Event], object]) -> Callable[[], None]:
        """`fn` sees every event from now on (on the recording thread: keep it quick);
        returns the call that unsubscribes it."""
        with self._lock:
            first = not self._subscribers
            self._subscribers = (*self._subscribers, fn)
            if first and self._on_active is not None:
                self._on_active(True)

        def unsubscribe() -> None:
            with self._lock:
                subs = list(self._subscribers)
                if fn not in subs:
                    return
                subs.remove(fn)
                self._subscribers = tuple(subs)
                if not subs and self._on_active is not None:
                    self._on_active(False)

        return unsubscribe

    def snapshot(self) -> list[Event]:
        return list(self.ring)


class BoundedStream:
    """A queue of events for one slow reader: `put` never blocks and never grows the queue
    past `limit`; what it drops comes out of `take` as one DroppedEvent."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._q: deque[Event] = deque()
        self._cond = threading.Condition()
        self.dropped = 0  # in total
        self._unreported = 0
        self._closed = False

    def put(self, event: Event) -> None:
        with self._cond:
            q = self._q
            if len(q) >= self.limit:
                self.dropped += 1
                self._unreported += 1
                if self._unreported == 1 and not q:
                    self._cond.notify()
                return
            q.append(event)
            if len(q) == 1:  # the reader waits only for an empty queue: one wake-up a batch
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take(self, timeout: float | None = None, most: int = 2048) -> list[Event] | None:
        """Up to `most` events (waiting up to `timeout` for the first); [] on timeout,
        None once closed and drained. A reader that lingers a little after a short batch
        (LINGER) lets the next one grow, and wakes less often the thread that records."""
        with self._cond:
            self._cond.wait_for(lambda: self._q or self._unreported or self._closed, timeout)
            out: list[Event] = []
            if self._unreported:
                out.append(DroppedEvent(time.time(), -1, self._unreported))
                self._unreported = 0
            while self._q and len(out) < most:
                out.append(self._q.popleft())
            if not out and self._closed:
                return None
            return out
