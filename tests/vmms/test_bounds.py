"""Bounded buffers (issue 11, finding 8) in the VMMS, with fake workers: a console client that
never reads is dropped once its backlog passes the bound (the VMMS's memory does not follow the
guest's output, the VM runs on, a new console works); finished migration records are capped
at the last N."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.vmms import api
from pyhv.vmms.client import VmmsClient
from pyhv.vmms.service import Vmms
from pyhv.worker.outcome import WORKER_ERROR, VmEnd
from tests.vmms.fakes import FakeIncomingBase, FakeWorker, fake_service

pytestmark = pytest.mark.simulation

MIB = 1 << 20


class _NeverArrives(FakeIncomingBase):
    """An incoming worker whose source never comes: it ends at once."""

    def start(self) -> None:
        super().start()
        self._finish(VmEnd(WORKER_ERROR, detail="no source came"), 0)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[Vmms, VmmsClient]]:
    migration = {"incoming_factory": _NeverArrives, "keep_finished": 3}
    with fake_service(tmp_path, migration=migration) as service:
        yield service


def _until(what: str, check: Any, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.02)
    raise AssertionError(f"not reached in {timeout} s: {what}")


def test_a_console_client_that_never_reads_is_dropped_and_pins_no_memory(
    service: tuple[Vmms, VmmsClient],
) -> None:
    vmms, c = service
    c.request("POST", "/api/vms", {"name": "a"})
    c.request("POST", "/api/vms/a/start")
    idle = c.console("a")  # never read while the guest prints
    entry = vmms.entry("a")
    assert entry is not None
    _until("the console is attached", lambda: len(entry.consoles) == 1)
    worker = FakeWorker.instances[-1]
    chunk = b"x" * 65536
    tracemalloc.start()
    try:
        for i in range(1024):  # 64 MiB of serial output, each chunk a new object
            worker._output(chunk[:-1] + bytes([i & 0x7F]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < api.CONSOLE_BUFFER_BYTES + 16 * MIB, peak  # not the 64 MiB the guest printed
    _until("the idle console is detached", lambda: entry.consoles == [])
    # Its connection was closed: what the kernel had buffered, then the end.
    idle.settimeout(10)
    got = 0
    while data := idle.recv(1 << 16):
        got += len(data)
    idle.close()
    assert got < 16 * MIB
    # The VM runs on and a console that reads works.
    assert c.request("GET", "/api/vms/a")["state"] == "running"
    live = c.console("a")
    live.settimeout(10)
    live.sendall(b"hello\r")
    seen = b""
    while b"hello\r\n" not in seen:
        seen += live.recv(1 << 16)
    live.close()


def test_a_console_client_that_stops_reading_is_dropped_after_the_send_timeout(
    service: tuple[Vmms, VmmsClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    vmms, c = service
    monkeypatch.setattr(api, "CONSOLE_SEND_TIMEOUT", 1.0)
    c.request("POST", "/api/vms", {"name": "a"})
    c.request("POST", "/api/vms/a/start")
    stalled = c.console("a")  # reads nothing from now on
    entry = vmms.entry("a")
    assert entry is not None
    _until("the console is attached", lambda: len(entry.consoles) == 1)
    worker = FakeWorker.instances[-1]
    # Half the backlog bound: the socket's buffers fill, the bound is never passed, so only
    # the send timeout can drop this client.
    for i in range(16):
        worker._output(bytes([65 + i]) * (32 << 10))
    _until("the stalled console is detached", lambda: entry.consoles == [], timeout=30)
    assert vmms.registry["pyhv VMMS API"].get("Stream Clients Dropped", "unix") == 1
    stalled.close()
    assert c.request("GET", "/api/vms/a")["state"] == "running"


def test_only_the_last_n_finished_migration_records_are_kept(
    service: tuple[Vmms, VmmsClient],
) -> None:
    vmms, c = service
    ids = []
    for i in range(6):
        settings = {"name": f"m{i}", "memory": 512 * MIB}
        ids.append(vmms.migrations.prepare_incoming({"settings": settings})["id"])
        _until(
            f"migration {ids[-1]} fails",
            lambda: c.request("GET", f"/api/migrations/{ids[-1]}")["state"] == "failed",
        )
    kept = [r["id"] for r in c.request("GET", "/api/migrations")["migrations"]]
    # The newest three finished ones as the last began, and the last.
    assert kept == ids[2:], (kept, ids)
