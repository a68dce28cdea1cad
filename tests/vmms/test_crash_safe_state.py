"""Crash-safe VMMS state (issue 11, finding 9): files are replaced atomically (a failed write
leaves the old content and no temporary file); a disk that refuses a VM's settings changes
nothing (`vm memory`, `vm create` answer 507 and the worker keeps its limits); a VM that arrives
by live migration while its settings cannot be saved runs on watched, its memory returned to the
pool when it ends and the error on its migration record."""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.vmms.client import ClientError, VmmsClient
from pyhv.vmms.service import Vmms
from pyhv.vmms.store import ConfigStore, write_atomically
from pyhv.worker.outcome import WORKER_ERROR, VmEnd
from tests.vmms.fakes import FakeDmWorker, FakeIncomingBase, FakeWorker, fake_service

GIB = 1 << 30
MIB = 1 << 20


def _disk_full(*args: Any, **kw: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.unit
def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "vm.json"
    write_atomically(path, "old\n")
    assert path.read_text() == "old\n" and oct(path.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setattr(os, "fsync", _disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, "new\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Vmms, VmmsClient]]:
    migration = {"incoming_factory": _Arriving}
    with fake_service(tmp_path, FakeDmWorker, reserve_bytes=GIB // 2, migration=migration) as s:
        yield s


@pytest.mark.simulation
def test_memory_limits_reach_the_worker_only_once_saved(
    service: tuple[Vmms, VmmsClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    vmms, c = service
    c.request("POST", "/api/vms", {"name": "dm1", "memory": "512M", "dynamic_memory": True})
    c.request("POST", "/api/vms/dm1/start")
    worker = FakeWorker.instances[-1]
    monkeypatch.setattr(ConfigStore, "save", _disk_full)
    with pytest.raises(ClientError, match="could not be saved .*No space left") as e:
        c.request("PATCH", "/api/vms/dm1", {"maximum": "3G"})
    assert e.value.status == 507
    assert not hasattr(worker, "limits")  # the worker was never told
    assert c.request("GET", "/api/vms/dm1")["settings"]["maximum"] != 3 * GIB
    with pytest.raises(ClientError, match="could not be saved") as e:
        c.request("POST", "/api/vms", {"name": "other"})
    assert e.value.status == 507
    assert [vm["name"] for vm in c.request("GET", "/api/vms")["vms"]] == ["dm1"]
    monkeypatch.undo()
    c.request("PATCH", "/api/vms/dm1", {"maximum": "3G"})
    assert worker.limits[1] == 3 * GIB  # type: ignore[attr-defined]
    # A worker that refuses puts the stored settings back as they were.
    worker.refuse_limits = "maximum can only go up"  # type: ignore[attr-defined]
    with pytest.raises(ClientError, match="did not take"):
        c.request("PATCH", "/api/vms/dm1", {"maximum": "4G"})
    stored = ConfigStore(vmms.store.state_dir).load_all()["dm1"]
    assert stored.maximum == 3 * GIB


class _Arriving(FakeIncomingBase):
    """An incoming migration's worker whose VM arrives as soon as it listens."""

    def __init__(self, token: str, listen: tuple[str, int], output: Any, **kw: Any) -> None:
        super().__init__(token, listen, output, **kw)
        self.arrived = threading.Event()

    def wait_listening(self, timeout: float = 30.0) -> tuple[str, int]:
        self.arrived.set()
        return super().wait_listening(timeout)

    def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None:
        if self.arrived.wait(timeout):
            return {"source": "127.0.0.1:2", "passes": 1, "pages": 1}
        return None


def _until(what: str, check: Any) -> Any:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not reached in 10 s: {what}")


@pytest.mark.simulation
def test_a_vm_arriving_while_the_disk_is_full_stays_watched(
    service: tuple[Vmms, VmmsClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    vmms, c = service
    free = c.request("GET", "/api/host")["free"]
    monkeypatch.setattr(ConfigStore, "save", _disk_full)
    settings = {"name": "mig1", "memory": 512 * MIB}
    mid = vmms.migrations.prepare_incoming({"settings": settings, "source": "a"})["id"]
    rec = _until(
        "the VM arrives",
        lambda: (r := c.request("GET", f"/api/migrations/{mid}"))["state"] == "running" and r,
    )
    assert "could not be saved" in rec["error"] and "No space left" in rec["error"]
    assert c.request("GET", "/api/vms/mig1")["state"] == "running"
    assert c.request("GET", "/api/host")["free"] == free - 512 * MIB
    # Its watcher is alive: the worker's end is seen and the memory goes back to the pool.
    worker = FakeWorker.instances[-1]
    worker._finish(VmEnd(WORKER_ERROR, detail="the guest crashed"), -9)
    _until("the VM's end is seen", lambda: c.request("GET", "/api/vms/mig1")["state"] == "crashed")
    _until("its memory is back", lambda: c.request("GET", "/api/host")["free"] == free)
