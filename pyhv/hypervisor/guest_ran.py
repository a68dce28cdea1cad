"""A trace that guest code ran, read by the test suite to hold each test to its `guest` marker.

Where the environment variable PYHV_GUEST_RAN_DIR names a directory (tests/conftest.py sets it;
worker processes inherit it), each VP thread writes one small file there as it starts its run
loop: named `<pid>-<tid>-<ns>` (process, kernel thread id, a monotonic clock: never reused),
holding the partition's name and the VP's index. Once per VP thread start, never per exit;
without the variable nothing is written.
"""

from __future__ import annotations

import os
import threading
import time

ENV = "PYHV_GUEST_RAN_DIR"


def note_vp_thread_start(partition: str, vp: int) -> None:
    """Record that this thread is about to run guest code (KVM_RUN) for VP `vp`."""
    where = os.environ.get(ENV)
    if not where:
        return
    name = f"{os.getpid()}-{threading.get_native_id()}-{time.monotonic_ns()}"
    try:
        with open(os.path.join(where, name), "w") as f:
            f.write(f"{partition} vp {vp}\n")
    except OSError:
        pass  # the suite is gone or the directory was removed: nothing to prove to anyone
