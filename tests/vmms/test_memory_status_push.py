"""A VM's memory status is pushed by its worker and kept by the VMMS: the balancer and the
counters read the latest one without asking any worker; the VSP's and the VPs' counters come
with it to /metrics; a worker that pushes a malformed status is refused and counted, and the
VMMS goes on."""

from __future__ import annotations

import queue
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pyhv.dynmem.status import MemoryStatus
from pyhv.vmms.client import VmmsClient
from pyhv.vmms.server import ApiServers
from pyhv.vmms.service import RUNNING, Vmms
from pyhv.worker.config import VmConfig
from pyhv.worker.messages import MemoryCall
from pyhv.worker.process import WorkerProcess

GIB = 1 << 30
#: Seconds a real guest may take to boot, negotiate Dynamic Memory and report (PVM is slow).
REPORT_DEADLINE = 120.0


class WatchedWorker(WorkerProcess):
    """A real worker process whose pushed statuses (after the VMMS took them) and refusals are
    queued for the test, and whose status requests are counted."""

    def __init__(self, config: VmConfig, output: Callable[[bytes], None]) -> None:
        super().__init__(config, output=output)
        self.statuses: queue.Queue[MemoryStatus] = queue.Queue()
        self.refusals: queue.Queue[str] = queue.Queue()
        self.status_requests = 0

    def subscribe_memory_status(
        self,
        on_status: Callable[[MemoryStatus], object],
        on_refused: Callable[[str], object] | None = None,
        on_refused_by_worker: Callable[[str], object] | None = None,
    ) -> None:
        def status(st: MemoryStatus) -> None:
            on_status(st)
            self.statuses.put(st)

        def refused(why: str) -> None:
            if on_refused is not None:
                on_refused(why)
            self.refusals.put(why)

        super().subscribe_memory_status(status, refused, on_refused_by_worker)

    def _send(self, msg: Any) -> None:
        if isinstance(msg, MemoryCall) and msg.call == "status":
            self.status_requests += 1
        super()._send(msg)

    def next_reported(self, deadline: float) -> MemoryStatus:
        """The next status pushed after the guest's DM driver reported."""
        while (left := deadline - time.monotonic()) > 0:
            try:
                st = self.statuses.get(timeout=left)
            except queue.Empty:
                break
            if st.reported:
                return st
        raise AssertionError(f"no reported memory status from VM {self.config.name!r} in time")


def _metrics(servers: ApiServers) -> dict[tuple[str, str], float]:
    """/metrics as {(sample name, its one label value): value}."""
    text = VmmsClient(socket_path=servers.unix.path, timeout=10).request("GET", "/metrics")
    return {
        (s.name, next(iter(s.labels.values()), "")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


class Host:
    """An in-process VMMS serving its API, whose workers are WatchedWorkers run under
    `command_prefix` (empty: the real worker)."""

    def __init__(self, tmp_path: Path, command_prefix: list[str], **vmms: Any) -> None:
        self.workers: list[WatchedWorker] = []

        def factory(config: VmConfig, output: Callable[[bytes], None]) -> WatchedWorker:
            w = WatchedWorker(config, output)
            w.command_prefix = command_prefix
            self.workers.append(w)
            return w

        self.vmms = Vmms(tmp_path / "state", budget_bytes=4 * GIB, worker_factory=factory, **vmms)
        self.servers = ApiServers(self.vmms, tmp_path / "vmms.sock", None)
        self.servers.start()

    def close(self) -> None:
        self.servers.close()
        self.vmms.close()


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    made: list[Host] = []
    yield made
    for h in made:
        h.close()


def _dm_vm_running(hosts: list[Host], tmp_path: Path) -> tuple[Host, WatchedWorker]:
    """A host with the real worker and the bundled guest, running DM VM "dm" (256M, 128M..1G)."""
    host = Host(tmp_path, [])
    hosts.append(host)
    host.vmms.create(
        {"name": "dm", "memory": "256M", "minimum": "128M", "maximum": "1G", "dynamic_memory": True}
    )
    host.vmms.start("dm")
    (worker,) = host.workers
    return host, worker


@pytest.mark.guest
def test_a_real_guests_status_reaches_the_vmms_with_no_request_and_its_counters_reach_metrics(
    hosts: list[Host], tmp_path: Path
) -> None:
    host, worker = _dm_vm_running(hosts, tmp_path)
    service, servers = host.vmms, host.servers
    pushed = worker.next_reported(time.monotonic() + REPORT_DEADLINE)
    latest = service.pool.latest("dm")
    assert latest is not None and latest.reported
    assert latest.assigned_pages == 256 * 256 and pushed.vsp.status_reports >= 1
    decision = service.balancer.tick()
    assert decision is not None and decision.vm_ids == ("dm",)
    assert worker.status_requests == 0  # the VMMS never asked the worker for its status
    # The counters pushed with it: the VSP's, and VP 0's intercepts (its serial output exits).
    second = worker.next_reported(time.monotonic() + REPORT_DEADLINE)
    m = _metrics(servers)
    assert m[("pyhv_dynamic_memory_vsp_status_reports_total", "dm")] >= 1
    assert m[("pyhv_dynamic_memory_vsp_messages_accepted_total", "dm")] >= 3
    assert m[("pyhv_hypervisor_virtual_processor_io_port_intercepts_total", "dm:Hv VP 0")] > 0
    assert second.vps[0].io_port > 0
    assert m[("pyhv_vm_worker_messages_memory_statuses_total", "dm")] >= 2
    assert m[("pyhv_dynamic_memory_vm_physical_memory_bytes", "dm")] == 256 << 20
    assert worker.status_requests == 0


#: A stand-in worker process: it speaks the worker protocol, pushes two malformed statuses and
#: one good one, and stops when asked.
FAKE_WORKER = textwrap.dedent(
    """
    import socket, sys
    from pyhv.dynmem.status import MemoryStatus
    from pyhv.worker import protocol
    from pyhv.worker.outcome import STOPPED, VmEnd

    sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--fd") + 1]))
    boot = protocol.recv(sock)
    pages = boot["config"]["memory"] // 4096
    protocol.send(sock, {"ev": "started", "pid": 1, "protocol": 2})
    good = MemoryStatus(pages, pages, 0, pages // 2, pages // 4, pages // 2).to_wire()
    protocol.send(sock, {"ev": "memory_status", "status": dict(good, assigned_pages=-1)})
    protocol.send(sock, {"ev": "memory_status", "status": "all of it"})
    protocol.send(sock, {"ev": "memory_status", "status": good})
    while (msg := protocol.recv(sock)) is not None and msg.get("op") != "stop":
        pass
    protocol.send(sock, {"ev": "ended", "end": VmEnd(STOPPED, detail="asked").to_dict()})
    """
)


@pytest.mark.simulation
def test_a_worker_pushing_a_malformed_status_is_refused_and_counted_and_the_vmms_goes_on(
    hosts: list[Host], tmp_path: Path
) -> None:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    # The stand-in runs instead of `python -m pyhv.worker` (whose argv it gets) and boots nothing.
    host = Host(tmp_path, [sys.executable, str(script)], image_resolver=lambda: str(script))
    hosts.append(host)
    service, servers, workers = host.vmms, host.servers, host.workers
    service.create({"name": "dm", "memory": "512M", "dynamic_memory": True})
    service.start("dm")
    (worker,) = workers
    deadline = time.monotonic() + 30
    refusals = [worker.refusals.get(timeout=deadline - time.monotonic()) for _ in range(2)]
    assert "Expected `int` >= 0 - at `$.status.assigned_pages`" in refusals[0]
    assert "Expected `object`, got `str` - at `$.status`" in refusals[1]
    good = worker.statuses.get(timeout=deadline - time.monotonic())
    assert service.pool.latest("dm") == good and good.committed_pages == 512 * 256 // 2
    m = _metrics(servers)
    assert m[("pyhv_vm_worker_messages_refused_messages_total", "dm")] == 2
    assert m[("pyhv_vm_worker_messages_memory_statuses_total", "dm")] == 1
    # The VMMS goes on: the VM runs, its memory is the good status's, the API answers.
    assert service.describe("dm")["state"] == RUNNING
    assert service.memory_status("dm")["committed"] == 256 << 20
    assert service.stop("dm")["state"] == "off"


#: A stand-in worker process: the VM named "hostile" sends garbage of every kind before one
#: good status; any other VM behaves. Both stop when asked.
GARBAGE_WORKER = textwrap.dedent(
    """
    import socket, struct, sys
    from pyhv.dynmem.status import MemoryStatus
    from pyhv.worker import messages as m, protocol
    from pyhv.worker.outcome import STOPPED, VmEnd

    sock = socket.socket(fileno=int(sys.argv[sys.argv.index("--fd") + 1]))
    boot = m.decode_op(protocol.recv_frame(sock))
    pages = boot.config["memory"] // 4096
    protocol.send_message(sock, m.Started(1, m.PROTOCOL_VERSION))
    good = MemoryStatus(pages, pages, 0, pages // 2, pages // 4, pages // 2)
    if boot.config["name"] == "hostile":
        for raw in (
            b"\\x00garbage",
            b'{"ev":"format_host"}',
            b'{"ev":"started","pid":true}',
            b'{"ev":"memory","id":1e400}',
            b'{"ev":"serial","data":"%%"}',
            b'{"ev":"memory_status","status":{"visible_pages":1},"extra":1}',
            b'{"ev":"ended","end":{"reason":"exploded"}}',
        ):
            protocol.send_frame(sock, raw)
        sock.sendall(struct.pack("<I", protocol.MAX_MESSAGE + 1) + bytes(protocol.MAX_MESSAGE + 1))
        protocol.send_message(sock, m.Refused("the owner's message did not decode"))
    protocol.send_message(sock, m.MemoryStatusPushed(good))
    while (raw := protocol.recv_frame(sock)) is not None:
        if isinstance(m.decode_op(raw), m.Stop):
            break
    protocol.send_message(sock, m.Ended(m.EndReport.of(VmEnd(STOPPED, detail="asked"))))
    """
)


@pytest.mark.simulation
def test_a_worker_sending_garbage_is_refused_and_counted_and_the_vmms_serves_the_other_vms(
    hosts: list[Host], tmp_path: Path
) -> None:
    script = tmp_path / "garbage_worker.py"
    script.write_text(GARBAGE_WORKER)
    host = Host(tmp_path, [sys.executable, str(script)], image_resolver=lambda: str(script))
    hosts.append(host)
    service, servers = host.vmms, host.servers
    for name in ("hostile", "calm"):
        service.create({"name": name, "memory": "512M", "dynamic_memory": True})
        service.start(name)
    hostile, calm = host.workers
    deadline = time.monotonic() + 30
    # Its one good status comes after all the garbage: once it is taken, all were refused.
    hostile.statuses.get(timeout=deadline - time.monotonic())
    calm.statuses.get(timeout=deadline - time.monotonic())
    refusals = [hostile.refusals.get_nowait() for _ in range(8)]
    assert hostile.refusals.empty() and calm.refusals.empty()
    assert "JSON is malformed" in refusals[0]
    assert "Invalid value 'format_host' - at `$.ev` (known: 'started'," in refusals[1]
    assert "Expected `int`, got `bool` - at `$.pid`" in refusals[2]
    assert "unknown VM end reason 'exploded'" in refusals[6]
    assert "length 1048577 exceeds 1048576" in refusals[7]
    m = _metrics(servers)
    assert m[("pyhv_vm_worker_messages_refused_messages_total", "hostile")] == 8
    assert m.get(("pyhv_vm_worker_messages_refused_messages_total", "calm"), 0) == 0
    assert m[("pyhv_vm_worker_messages_messages_refused_by_worker_total", "hostile")] == 1
    assert m[("pyhv_vm_worker_messages_memory_statuses_total", "calm")] == 1
    # The VMMS goes on: both VMs run (a garbage "ended" ended nothing), the API answers.
    assert service.describe("hostile")["state"] == RUNNING
    assert service.describe("calm")["state"] == RUNNING
    assert service.memory_status("calm")["committed"] == 256 << 20
    assert service.stop("calm")["state"] == "off"
    assert service.stop("hostile")["state"] == "off"


@pytest.mark.guest
def test_after_a_hot_remove_the_vmms_shows_the_lower_guest_visible_memory(
    hosts: list[Host], tmp_path: Path
) -> None:
    host, worker = _dm_vm_running(hosts, tmp_path)
    service, servers = host.vmms, host.servers
    worker.next_reported(time.monotonic() + REPORT_DEADLINE)
    worker.set_memory_target(512 << 20)  # a hot-add of 256 MiB, straight to the worker
    deadline = time.monotonic() + REPORT_DEADLINE
    while (latest := service.pool.latest("dm")) is None or latest.visible_pages != 512 * 256:
        worker.statuses.get(timeout=max(0.1, deadline - time.monotonic()))
    plan = worker.hot_remove_memory()
    assert plan["requested_pages"] == 256 * 256
    while (latest := service.pool.latest("dm")) is None or latest.visible_pages != 256 * 256:
        worker.statuses.get(timeout=max(0.1, deadline - time.monotonic()))
    # `pyhv vm show` reads this, and the counters are fed from the same pushed status
    shown = service.describe("dm")["memory"]
    assert shown["visible"] == 256 << 20
    assert latest.vsp.hot_removed_pages == 256 * 256
    service.balancer.tick()  # Perfmon's "Guest Visible Physical Memory", from that status
    m = _metrics(servers)
    assert m[("pyhv_dynamic_memory_vm_guest_visible_physical_memory_bytes", "dm")] == 256 << 20
    assert m[("pyhv_dynamic_memory_vsp_hot_removed_pages_total", "dm")] == 256 * 256
    assert m[("pyhv_dynamic_memory_vsp_hot_remove_refusals_total", "dm")] == 0
