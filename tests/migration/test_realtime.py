"""The pause's real-time priority (pyhv.migration.realtime): threads raised to SCHED_FIFO and
put back, and without the privilege left as they were, counted, never an error."""

from __future__ import annotations

import os
import threading

import pytest

from pyhv.migration.realtime import PRIORITY, Boost

pytestmark = pytest.mark.unit

NOBODY = 65534


def _root() -> None:
    assert os.geteuid() == 0, (
        "these tests raise threads to SCHED_FIFO: run them as root (or with CAP_SYS_NICE)"
    )


def test_threads_are_raised_and_put_back() -> None:
    _root()
    parked = threading.Event()
    done = threading.Event()
    other = threading.Thread(target=lambda: (parked.set(), done.wait(10)), daemon=True)
    other.start()
    parked.wait(10)
    boost = Boost()
    try:
        boost.add()  # this thread
        boost.add(other)
        boost.add(other)  # once is enough
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_FIFO
        assert os.sched_getparam(other.native_id).sched_priority == PRIORITY
        assert boost.counts() == {"granted": 2, "refused": 0}
        boost.drop(other)
        assert os.sched_getscheduler(other.native_id) == os.SCHED_OTHER
        assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_FIFO
    finally:
        boost.end()
        done.set()
    assert os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER
    other.join(10)


def test_without_the_privilege_threads_keep_their_policy_and_the_refusal_is_counted() -> None:
    _root()
    pid = os.fork()
    if pid == 0:  # the child, as nobody: no CAP_SYS_NICE, RLIMIT_RTPRIO 0
        code = 1
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            boost = Boost()
            boost.add()  # refused: no exception
            ok = (
                boost.counts() == {"granted": 0, "refused": 1}
                and os.sched_getscheduler(0) == os.SCHED_OTHER
            )
            boost.end()
            code = 0 if ok else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the unprivileged child did not fall back"
