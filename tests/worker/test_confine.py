"""The worker's seccomp allow-list (pyhv.worker.confine): threads work under it, a fork or an
exec kills the whole process with SIGSYS (what the VMMS reports as outside the allow-list)."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

SETUP = "import os, threading\nfrom pyhv.worker.confine import confine\nconfine(1 << 30)\n"


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SETUP + code], capture_output=True, text=True, timeout=60
    )


def test_threads_files_and_memfds_work_under_the_filter() -> None:
    r = _run(
        "t = threading.Thread(target=lambda: None); t.start(); t.join()\n"
        "fd = os.memfd_create('pyhv-ram'); os.ftruncate(fd, 1 << 20)\n"
        "print(open('/proc/self/status').read().count('Seccomp:\t2'), 'ok')\n"
    )
    assert r.returncode == 0 and r.stdout.split() == ["1", "ok"], r.stderr


@pytest.mark.parametrize("call", ["os.fork()", "os.execv('/bin/true', ['true'])"])
def test_a_call_outside_the_allow_list_kills_the_process_with_sigsys(call: str) -> None:
    r = _run(call + "\nprint('survived')\n")
    assert r.returncode == -signal.SIGSYS and "survived" not in r.stdout, (r.returncode, r.stderr)
