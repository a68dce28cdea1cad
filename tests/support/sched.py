"""Scheduling policies of a process's threads (the migration's real-time priority is for the
pause only: afterwards no thread of either worker may still be SCHED_FIFO)."""

from __future__ import annotations

import os


def realtime_threads(pid: int) -> list[int]:
    """The threads of process `pid` whose policy is SCHED_FIFO or SCHED_RR (gone ones skipped)."""
    out = []
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            policy = os.sched_getscheduler(int(name))
        except OSError:  # it ended meanwhile
            continue
        if policy in (os.SCHED_FIFO, os.SCHED_RR):
            out.append(int(name))
    return out
