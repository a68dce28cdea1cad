"""Runtime memory resize through the VMMS API with fake workers: what cannot be resized is refused
with its reason before anything reaches a worker: a VM that is off, one without Dynamic Memory,
a guest that did not negotiate hot-remove, a malformed body; while a resize is under way, the
VM's settings, another resize and a migration wait, and the balancer leaves it alone. (A real
guest growing and shrinking: test_memory_resize_guest.py.)"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from pyhv.dynmem.status import MemoryStatus
from pyhv.vmms.client import ClientError
from pyhv.vmms.inventory import VmmsError
from tests.support.wait import wait_for
from tests.vmms.fakes import FakeDmWorker, FakeWorker, fake_service

pytestmark = pytest.mark.simulation

MIB = 1 << 20


class NoHotRemoveWorker(FakeDmWorker):
    """A worker whose guest negotiated Dynamic Memory without hot-remove (protocol 1.0)."""

    removed: list[int | None] = []

    def memory_status(self) -> dict[str, Any]:
        return {"hot_remove": False}

    def hot_remove_memory(self, pages: int | None = None) -> dict[str, Any]:
        self.removed.append(pages)
        return {}


def _refused(client: Any, body: object, status: int, words: str) -> None:
    with pytest.raises(ClientError, match=words) as e:
        client.request("POST", "/api/vms/dm/memory/resize", body)
    assert e.value.status == status


def test_what_cannot_be_resized_is_refused_with_the_reason(tmp_path: Path) -> None:
    with fake_service(tmp_path, NoHotRemoveWorker) as (vmms, client):
        client.request(
            "POST", "/api/vms",
            {"name": "dm", "memory": "512M", "dynamic_memory": True, "minimum": "256M"},
        )  # fmt: skip
        _refused(client, {"memory": "256M"}, 409, r"VM 'dm' is off: a resize is for a running")
        client.request("POST", "/api/vms/dm/start")
        _refused(client, {"memory": True}, 400, "memory")
        _refused(client, {"memory": "256M", "x": 1}, 400, "x")
        _refused(client, {"memory": "255M"}, 400, "not a multiple of 2M")
        _refused(client, {"memory": "128M"}, 400, "below VM 'dm''s minimum 256M")
        _refused(client, {"memory": "4G"}, 400, "above VM 'dm''s maximum 2G")
        _refused(client, {"memory": "256M"}, 409, "did not negotiate hot-remove")
        assert NoHotRemoveWorker.removed == []
        assert client.request("GET", "/api/vms/dm")["settings"]["memory"] == 512 * MIB
        # and the VM can still be resized once refused: nothing was left marked in progress
        _refused(client, {"memory": "256M"}, 409, "did not negotiate hot-remove")


def test_a_vm_without_dynamic_memory_is_told_why(tmp_path: Path) -> None:
    with fake_service(tmp_path, FakeWorker) as (vmms, client):
        client.request("POST", "/api/vms", {"name": "dm", "memory": "512M"})
        client.request("POST", "/api/vms/dm/start")
        _refused(client, {"memory": "1G"}, 409, "Dynamic Memory is not enabled for VM 'dm'")


class SlowGrowWorker(FakeDmWorker):
    """A worker whose hot-add is done only once `go` is set; from then on its guest reports
    the grown memory (as a real guest does every second) until the worker is gone. `asked` is
    set when the resize's request reached it. Both per worker: nothing carries over to another
    test."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.asked, self.go, self.gone = threading.Event(), threading.Event(), threading.Event()

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        pages = target_bytes // 4096
        grown = MemoryStatus(pages, pages, 0, pages // 2, pages // 2, pages // 2)

        def reports() -> None:
            self.go.wait()
            # Not one status but a report after each interval: the resize counts statuses
            # newer than the one it saw after its request was answered, and a single status
            # pushed before it looked would leave it waiting for a report that never came.
            while not self.gone.is_set():
                for listener in self._listeners:
                    listener(grown)
                self.gone.wait(0.05)

        threading.Thread(target=reports, daemon=True).start()
        self.asked.set()
        return {}

    def _finish(self, *a: Any) -> None:
        self.gone.set()
        self.go.set()
        super()._finish(*a)


def test_while_a_vm_is_resized_its_settings_and_a_migration_wait(tmp_path: Path) -> None:
    with fake_service(tmp_path, SlowGrowWorker) as (vmms, client):
        client.request("POST", "/api/vms", {"name": "dm", "memory": "512M", "dynamic_memory": True})
        client.request("POST", "/api/vms/dm/start")
        answer: list[Any] = []
        t = threading.Thread(target=lambda: answer.append(vmms.resize_memory("dm", "1G")))
        t.start()
        try:
            wait_for(lambda: "dm" in vmms._resizing, 10, "the resize under way")
            (worker,) = FakeWorker.instances
            worker.asked.wait(30)  # the hot-add reached the worker: the resize is mid-way
            assert worker.asked.is_set(), "the resize never asked the worker for the hot-add"
            with pytest.raises(ClientError, match="VM 'dm' is being resized") as e:
                client.request("PATCH", "/api/vms/dm", {"buffer": 50})
            assert e.value.status == 409
            _refused(client, {"memory": "768M"}, 409, "is being resized")
            with pytest.raises(VmmsError, match="is being resized"):
                vmms.begin_migration("dm", "m1")
            assert "dm" not in vmms._dm_vms()  # the balancer leaves it alone meanwhile
        finally:
            for w in FakeWorker.instances:
                w.go.set()
            t.join(30)
        (r,) = answer
        assert (r["before"], r["visible"], r["added"], r["complete"]) == (
            512 * MIB, 1024 * MIB, 512 * MIB, True,
        )  # fmt: skip
        assert r["startup"] == 1024 * MIB
        assert client.request("GET", "/api/vms/dm")["settings"]["memory"] == 1024 * MIB
        client.request("PATCH", "/api/vms/dm", {"buffer": 50})  # taken again once it ended
