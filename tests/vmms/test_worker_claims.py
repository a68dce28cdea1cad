"""The VMMS checks each worker's memory claims against the kernel's own figure (the blocks of
its guest-RAM memfds): a stand-in worker - a real process holding 32 MiB in a memfd - that
claims 1 MiB in its memory status is reported (log, counter, `vm show` field), and the pool
counts what the kernel holds, not the claim."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyhv.dynmem.status import MemoryStatus
from pyhv.vmms.claims import memfd_pages
from pyhv.vmms.service import Vmms
from pyhv.worker.config import VmConfig
from tests.vmms.fakes import FakeDmWorker

pytestmark = pytest.mark.simulation

MIB = 1 << 20
HOLDER = (
    "import mmap, os, sys\n"
    "fd = os.memfd_create('pyhv-ram')\n"
    "os.ftruncate(fd, 32 << 20)\n"
    "m = mmap.mmap(fd, 32 << 20)\n"
    "m.write(b'x' * (32 << 20))\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


class LyingWorker(FakeDmWorker):
    """A worker process whose guest RAM holds 32 MiB while its status claims 1 MiB."""

    def __init__(self, config: VmConfig, output: Callable[[bytes], None]) -> None:
        super().__init__(config, output)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )

    def status(self) -> MemoryStatus:
        return MemoryStatus(8192, 256, 7936, 128, 128, 128)  # 1 MiB assigned, 31 ballooned

    def start(self) -> None:
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline() == b"ready\n"
        super().start()
        self.pid = self.proc.pid

    def stop(self) -> None:
        super().stop()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def vmms(tmp_path: Path) -> Iterator[Vmms]:
    v = Vmms(
        tmp_path / "state",
        budget_bytes=1 << 30,
        worker_factory=LyingWorker,
        image_resolver=lambda: "/bin/true",  # the stand-in boots nothing
    )
    v.start_balancer()
    try:
        yield v
    finally:
        v.close()


def test_memfd_pages_counts_a_processes_guest_ram_memfds() -> None:
    w = LyingWorker(VmConfig.create(image="/bin/true", memory=32 * MIB), lambda b: None)
    w.start()
    try:
        assert memfd_pages(w.proc.pid) * 4096 == 32 * MIB
    finally:
        w.stop()


def test_a_worker_that_claims_less_than_the_kernel_holds_is_reported_and_counted_at_the_kernels_figure(
    vmms: Vmms,
) -> None:
    vmms.create({"name": "liar", "memory": "32M", "dynamic_memory": True})
    vmms.start("liar")
    shown: dict[str, object] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        shown = vmms.describe("liar")
        if shown["enforcement"]["claims_disagreements"]:  # type: ignore[index]
            break
        time.sleep(0.05)
    enforcement = shown["enforcement"]
    assert enforcement["claims_disagreements"] >= 1, shown  # type: ignore[index]
    assert enforcement["kernel_ram"] == 32 * MIB  # type: ignore[index]
    assert "claims 1 MiB assigned, the kernel holds 32 MiB" in enforcement["last_disagreement"]  # type: ignore[index]
    # The pool takes the kernel's figure: the lie frees nothing for other VMs.
    assert shown["memory"]["assigned"] == 32 * MIB  # type: ignore[index]
    counters = vmms.counters()
    assert any(k.endswith("Claims Disagreements") and v >= 1 for k, v in counters.items()), counters
