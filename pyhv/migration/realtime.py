"""Real-time priority for the threads on a migration's critical path, for the pause only.

On a loaded host a step of the pause can wait 1-20 ms for a CPU (the source's VP threads
parking, the destination's receiver after the STATE frame): more than the pause's work. For
those few milliseconds the threads that carry it (the source's migration thread and the VP
threads it parks, the destination's receiver and the VP threads it wakes) run SCHED_FIFO, and
go back to SCHED_OTHER as soon as their step is done: none stays real-time while it copies RAM
or runs guest code. Without the privilege (CAP_SYS_NICE or an RLIMIT_RTPRIO) the threads keep
their policy: the migration goes on, and the refusal is counted (``refused``), never raised.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger("pyhv.migration")

#: Low among real-time priorities (1-99): above every SCHED_OTHER thread, below the kernel's
#: own real-time threads (migration/N, watchdogs).
PRIORITY = 10


class Boost:
    """Threads raised to SCHED_FIFO (`add`), all put back to SCHED_OTHER by `end()`."""

    def __init__(self) -> None:
        self._tids: list[int] = []
        self._raised: set[int] = set()
        self.granted = 0  #: threads raised (each counted once)
        self.refused = 0  #: threads left as they were (no privilege, or gone)

    def add(self, thread: threading.Thread | None = None) -> None:
        """Raise `thread` (default: the calling one)."""
        t = thread or threading.current_thread()
        tid = t.native_id
        if tid is None or tid in self._tids:
            return
        try:
            os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(PRIORITY))
        except OSError as e:  # EPERM without the privilege; ESRCH for a thread that ended
            self.refused += 1
            if self.refused == 1:
                log.debug("no real-time priority for the pause (%s): the threads keep theirs", e)
            return
        self._tids.append(tid)
        if tid not in self._raised:
            self._raised.add(tid)
            self.granted += 1

    def drop(self, thread: threading.Thread | None = None) -> None:
        """Put one thread back to SCHED_OTHER (default: the calling one)."""
        tid = (thread or threading.current_thread()).native_id
        if tid in self._tids:
            self._tids.remove(tid)
            _normal(tid)

    def end(self) -> None:
        """Every raised thread back to SCHED_OTHER."""
        for tid in self._tids:
            _normal(tid)
        self._tids.clear()

    def counts(self) -> dict[str, int]:
        return {"granted": self.granted, "refused": self.refused}


def _normal(tid: int) -> None:
    try:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except OSError:  # it ended meanwhile
        pass


__all__ = ["PRIORITY", "Boost"]
