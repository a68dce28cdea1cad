"""A worker's Smart Paging figure is checked by the VMMS: a status claiming pages in a Smart
Paging file the VM was not given, or more than its file backs (which would make the pool count
less than the host holds for it), is refused and counted, and the VMMS goes on with the good
ones. Stand-in worker processes, a real VMMS in-process."""

from __future__ import annotations

import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from pyhv.vmms.service import RUNNING, Vmms
from pyhv.worker.config import VmConfig
from pyhv.worker.process import WorkerProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.simulation

MIB = 1 << 20

#: A stand-in worker: it pushes a lying status first (Smart Paging pages it was not given, or
#: one page more than its file), then a true one, and checks it inherited the file's fd.
LIAR = textwrap.dedent(
    """
    import os, socket, stat, sys
    from pyhv.dynmem.status import MemoryStatus
    from pyhv.worker import messages as m, protocol
    from pyhv.worker.outcome import STOPPED, VmEnd

    sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--fd") + 1]))
    boot = m.decode_op(protocol.recv_frame(sock))
    pages = boot.config["memory"] // 4096
    sp = boot.smart_paging
    paged = 0 if sp is None else sp.size // 4096
    if sp is not None:
        st = os.fstat(sp.fd)  # the file the VMMS opened, inherited
        assert stat.S_ISREG(st.st_mode) and st.st_size == sp.size, st
    protocol.send_message(sock, m.Started(os.getpid(), m.PROTOCOL_VERSION))
    lie = paged + 1000 if sp is None else paged + 1
    for claim in (lie, paged):
        status = MemoryStatus(pages, pages - claim, 0, 100, 100, 100, smart_paging_pages=claim)
        protocol.send_message(sock, m.MemoryStatusPushed(status))
    while (raw := protocol.recv_frame(sock)) is not None:
        if isinstance(m.decode_op(raw), m.Stop):
            break
    protocol.send_message(sock, m.Ended(m.EndReport.of(VmEnd(STOPPED, detail="asked"))))
    """
)


def _vmms(tmp_path: Path, budget: int) -> Vmms:
    script = tmp_path / "liar.py"
    script.write_text(LIAR)

    def factory(config: VmConfig, output: Callable[[bytes], None]) -> WorkerProcess:
        w = WorkerProcess(config, output=output)
        w.command_prefix = [sys.executable, str(script)]  # it runs instead of pyhv.worker
        return w

    return Vmms(
        tmp_path / "state",
        budget_bytes=budget,
        worker_factory=factory,
        image_resolver=lambda: str(script),
    )


def _refused(vmms: Vmms, name: str) -> float:
    key = rf"\Hyper-V VM Worker Messages({name})\Refused Messages"
    return vmms.counters().get(key, 0)


def test_smart_paging_pages_a_vm_was_not_given_are_refused(tmp_path: Path) -> None:
    vmms = _vmms(tmp_path, 1024 * MIB)
    try:
        vmms.create({"name": "vm", "memory": "512M", "dynamic_memory": True})
        vmms.start("vm")
        status = wait_for(lambda: vmms.pool.latest("vm"), 30, "the true status")
        assert status.smart_paging_pages == 0 and status.assigned_pages == 512 * 256
        assert _refused(vmms, "vm") == 1
        assert vmms.describe("vm")["memory"]["smart_paging"]["in_use"] is False
        assert vmms.pool.free_pages == 512 * 256
    finally:
        vmms.close()


def test_more_smart_paging_pages_than_the_file_backs_are_refused(tmp_path: Path) -> None:
    vmms = _vmms(tmp_path, 384 * MIB)
    try:
        vmms.create({"name": "sp", "memory": "512M", "dynamic_memory": True, "minimum": "128M"})
        vmms.start_balancer()
        shown = vmms.restart("sp")
        assert shown["state"] == RUNNING and shown["memory"]["smart_paging"]["in_use"]
        status = wait_for(lambda: vmms.pool.latest("sp"), 30, "the true status")
        assert status.smart_paging_pages == 128 * 256
        assert _refused(vmms, "sp") == 1
        sp = vmms.describe("sp")["memory"]["smart_paging"]
        assert sp["bytes"] == 128 * MIB and Path(sp["file"]).exists()
        # The stand-in has no guest to balloon: Smart Paging stays until it ends.
        assert vmms.pool.free_pages == 0
        vmms.stop("sp")
        assert not Path(sp["file"]).exists()  # the file goes with the VM
        assert os.listdir(tmp_path / "state" / "vms" / "sp") == []
    finally:
        vmms.close()
