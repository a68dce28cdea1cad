"""A VM run by `pyhv run --process --control SOCK` (no VMMS) and `pyhv memory --control SOCK`
against it, for the tests of the operator's control socket."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.wait import wait_for

Memory = Callable[..., "subprocess.CompletedProcess[str]"]


@contextmanager
def control_vm(sock: str, *run_args: str) -> Iterator[Memory]:
    """`pyhv run --process --control sock *run_args`; yields `memory(*args)`, which runs
    `pyhv memory --control sock *args`. On the way out the console stops the VM (Ctrl-A x),
    which must end it with status 0."""
    run = subprocess.Popen(
        [sys.executable, "-m", "pyhv.cli", "run", "--process", *run_args, "--control", sock],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip

    def memory(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "pyhv.cli", "memory", "--control", sock, *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)

    try:
        assert wait_for(lambda: Path(sock).exists(), 30, "Path(sock).exists()")
        yield memory
    finally:
        assert run.stdin is not None
        run.stdin.write(b"\x01x")  # Ctrl-A x: the console stops the VM
        run.stdin.close()
        try:
            run.wait(30)
        except subprocess.TimeoutExpired:
            run.kill()
            run.wait()
    assert run.returncode == 0, run.stderr.read() if run.stderr else ""
