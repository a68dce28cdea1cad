"""Live migration between two VMMS instances. First with the reference guest under KVM and two
`pyhv vmms serve` processes: the VM migrated by `pyhv vm migrate` runs at the destination (its
console answers there with what only that guest holds) and is gone at the source. Then the
VMMS's part of it with fake workers (no KVM): the source VMMS asks the destination VMMS to
prepare (authenticated with the destination's token, its pool checked), then drives its worker;
on success the VM is registered at the destination and gone at the source, on failure it runs on
at the source and the destination holds nothing. A migrating VM is left alone by the balancer and
conflicting requests get 409. A connection lost after COMMIT is settled by asking the
destination; if it cannot tell, the VM stays paused at the source."""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.dynmem.status import MemoryStatus
from pyhv.migration.source import MigrationInDoubt
from pyhv.migration.stream import MigrationError
from pyhv.vmms.client import ClientError, VmmsClient
from pyhv.vmms.server import ApiServers
from pyhv.vmms.service import Vmms
from pyhv.worker.outcome import STOPPED, WORKER_ERROR, VmEnd
from tests.support.wait import wait_for
from tests.vmms.fakes import FakeDmWorker, FakeWorker

pytestmark = pytest.mark.simulation

pytestmark = pytest.mark.simulation

GIB = 1 << 30
MIB = 1 << 20
_ports = itertools.count(40_000)


class FakeIncoming(FakeWorker):
    """A destination worker that 'listens' and, when told, has its VM arrive."""

    instances: list[FakeIncoming] = []

    def __init__(self, token: str, listen: tuple[str, int], output: Any, **kw: Any) -> None:
        super().__init__(None, output)  # type: ignore[arg-type]
        self.token, self.kw = token, kw
        self.address = (listen[0], next(_ports))
        self._arrived = threading.Event()
        FakeIncoming.instances.append(self)

    def start(self) -> None:
        self.pid = 1

    def wait_listening(self, timeout: float = 30.0) -> tuple[str, int]:
        return self.address

    def arrive(self) -> None:
        self._output(b"pyhv> ")
        self._arrived.set()

    def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None:
        if self._arrived.wait(timeout):
            return {"source": "127.0.0.1:1", "passes": 3, "pages": 100}
        return None

    @property
    def end(self) -> VmEnd | None:
        return self._end

    def close(self, timeout: float = 5.0) -> None:
        self._finish(VmEnd(WORKER_ERROR, detail="incoming migration failed"), 0)


class FakeMigrator:
    """Drives the 'source worker': reports progress, then waits for `gate` and ends as told."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.running = threading.Event()
        self.outcome: Callable[[Any, tuple[str, int]], dict[str, Any]] = self.succeed
        self.calls: list[tuple[tuple[str, int], str, dict[str, Any]]] = []
        self.decisions: list[bool] = []

    def migrate(
        self,
        worker: Any,
        address: tuple[str, int],
        token: str,
        options: dict[str, Any],
        on_progress: Callable[[dict[str, Any]], object],
        counters: Any,
    ) -> dict[str, Any]:
        self.calls.append((address, token, options))
        on_progress({"phase": "pass1", "pages_sent": 10})
        self.running.set()
        assert self.gate.wait(10)
        return self.outcome(worker, address)

    def incoming(self, address: tuple[str, int]) -> FakeIncoming:
        return next(i for i in FakeIncoming.instances if i.address == address)

    def succeed(self, worker: Any, address: tuple[str, int]) -> dict[str, Any]:
        self.incoming(address).arrive()
        worker._finish(VmEnd(STOPPED, detail=f"migrated to {address}"), 0)
        return {"total_time": 0.1, "downtime": 0.01, "passes": 3}

    def decide(self, worker: Any, migration_id: int, resume: bool) -> None:
        self.decisions.append(resume)
        if not resume:
            worker._finish(VmEnd(STOPPED, detail="migrated"), 0)


class Host:
    def __init__(self, tmp: Path, name: str, budget: int, migrator: FakeMigrator) -> None:
        self.vmms = Vmms(
            tmp / name,
            budget_bytes=budget,
            reserve_bytes=GIB // 2,
            worker_factory=lambda config, output: FakeWorker(config, output),
            image_resolver=lambda: __file__,
            migration={
                "incoming_factory": FakeIncoming,
                "migrator": migrator,
                "in_doubt_timeout": 1.0,
            },
        )
        self.servers = ApiServers(self.vmms, tmp / name / "vmms.sock", ("127.0.0.1", 0))
        self.servers.start()
        host, port = self.servers.tcp_address  # type: ignore[misc]
        self.address = f"{host}:{port}"
        self.token = (tmp / name / "migration-token").read_text().strip()  # all it needs
        self.client = VmmsClient(socket_path=self.servers.unix.path, timeout=10)

    def free(self) -> int:
        return int(self.client.request("GET", "/api/host")["free"])

    def names(self) -> list[str]:
        return [vm["name"] for vm in self.client.request("GET", "/api/vms")["vms"]]

    def close(self) -> None:
        self.servers.close()
        self.vmms.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Host, Host, FakeMigrator]]:
    FakeIncoming.instances.clear()
    migrator = FakeMigrator()
    a = Host(tmp_path, "a", 4 * GIB, migrator)
    b = Host(tmp_path, "b", 2 * GIB, migrator)
    yield a, b, migrator
    migrator.gate.set()
    a.close()
    b.close()


def _running_vm(host: Host, name: str = "vm1", memory: str = "512M", **kw: Any) -> None:
    host.client.request("POST", "/api/vms", {"name": name, "memory": memory, **kw})
    host.client.request("POST", f"/api/vms/{name}/start")


def _migrate(a: Host, b: Host, name: str = "vm1", token: str | None = None) -> dict[str, Any]:
    return a.client.request(  # type: ignore[no-any-return]
        "POST", f"/api/vms/{name}/migrate", {"destination": b.address, "token": token or b.token}
    )


def _until_final(host: Host, mid: str) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        rec: dict[str, Any] = host.client.request("GET", f"/api/migrations/{mid}")
        return rec if rec["state"] in ("done", "failed", "in-doubt") else None

    return wait_for(ended, 30, f"migration {mid} ending", 0.02)


def _mem(text: str) -> dict[str, int]:
    """The guest's `mem` figures: {"visible": MiB, "free": ..., "committed": ..., ...}."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^([\w-]+): (\d+) MiB", text, re.M)}


@pytest.mark.guest
def test_a_vm_migrated_through_the_vmms_runs_at_the_destination_and_is_gone_at_the_source(
    tmp_path: Path,
) -> None:
    from tests.vmms.vmms_process import vmms_pair  # real hosts: this file's others are fakes

    with vmms_pair(tmp_path) as (a, b):
        free_a, free_b = a.free(), b.free()
        a.vm("create", "vm1", "--memory", "256M")
        a.vm("start", "vm1")
        # State only this guest holds: a testlimit task of an odd size, the guest's own count
        # of its memory, its clock.
        assert "committed 37 MiB" in a.shell("vm1", "testlimit -m 37", b"committed 37 MiB")
        task = "task 0: testlimit committed 37 MiB, allocated 37 MiB"
        # until the task has allocated all of it
        wait_for(lambda: task in a.shell("vm1", "tasks", b"task 0"), 60, repr(task))
        mem_a = _mem(a.shell("vm1", "mem", b"hot-added: "))
        assert mem_a["committed"] >= 37 and len(mem_a) == 5, mem_a
        ticks_a = a.ticks("vm1")
        out = a.vm(
            "migrate", "vm1", "--to", b.address, "--token-file", str(b.token_file), "--encrypt"
        )
        assert f"vm1 runs on {b.address} now" in out, out
        # Gone at A, its memory back in A's pool; running at B on B's memory.
        assert "vm1" not in a.names() and a.free() == free_a
        assert b.state_of("vm1") == "running" and b.free() == free_b - 256 * MIB
        # B's console answers from that same guest: its task, its memory figures to the MiB,
        # its physical memory manager consistent, its clock gone on from where it was.
        assert task in b.shell("vm1", "tasks", b"task 0")
        assert _mem(b.shell("vm1", "mem", b"hot-added: ")) == mem_a
        assert "pmm: consistent" in b.shell("vm1", "pmmcheck", b"pmm: ")
        assert b.ticks("vm1") > ticks_a


def test_a_migration_through_the_vmms_moves_the_vms_entry_and_memory_to_the_destination(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    free_a, free_b = a.free(), b.free()
    _running_vm(a)
    rec = _migrate(a, b)
    assert rec["state"] in ("preparing", "migrating") and rec["direction"] == "outgoing"
    assert migrator.running.wait(5)
    # The destination holds the VM's memory and an entry that is arriving; progress is readable.
    assert b.free() == free_b - 512 * MIB
    assert b.client.request("GET", "/api/vms/vm1")["state"] == "incoming"
    assert a.client.request("GET", f"/api/migrations/{rec['id']}")["progress"]["phase"] == "pass1"
    address, token, options = migrator.calls[0]
    incoming = migrator.incoming(address)
    assert token == incoming.token != b.token  # a one-time migration token, not the API's
    assert options["resume_in_doubt"] is False
    assert incoming.kw["max_memory"] == 512 * MIB
    migrator.gate.set()
    done = _until_final(a, rec["id"])
    assert done["state"] == "done", done
    assert "vm1" not in a.names() and a.free() == free_a
    assert not (a.vmms.store.state_dir / "vms" / "vm1.json").exists()
    vm = b.client.request("GET", "/api/vms/vm1")
    assert vm["state"] == "running" and vm["migration"] is None
    assert b.client.request("GET", f"/api/migrations/{done['remote_id']}")["state"] == "running"
    assert (b.vmms.store.state_dir / "vms" / "vm1.json").exists()
    # It is an ordinary VM there now: it stops and its memory returns to B's pool.
    b.client.request("POST", "/api/vms/vm1/stop")
    assert b.free() == free_b


def test_requests_that_conflict_with_a_migration_get_409_with_the_reason(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    _running_vm(a, dynamic_memory=True)
    rec = _migrate(a, b)
    assert migrator.running.wait(5)
    for method, path, body in [
        ("POST", "/api/vms/vm1/stop", None),
        ("DELETE", "/api/vms/vm1", None),
        ("PATCH", "/api/vms/vm1", {"buffer": 30}),
        ("POST", "/api/vms/vm1/memory", {"target": "600M"}),
        ("POST", "/api/vms/vm1/migrate", {"destination": b.address, "token": b.token}),
    ]:
        with pytest.raises(ClientError) as err:
            a.client.request(method, path, body)
        assert err.value.status == 409, (method, path)
        assert "is being migrated" in str(err.value) and rec["id"] in str(err.value)
    # The arriving entry at the destination is just as protected.
    with pytest.raises(ClientError) as err:
        b.client.request("DELETE", "/api/vms/vm1")
    assert err.value.status == 409
    migrator.gate.set()
    assert _until_final(a, rec["id"])["state"] == "done"


class _HungryDmWorker(FakeDmWorker):
    """A DM worker whose guest commits all it has: the balancer wants to add memory."""

    def __init__(self, config: Any, output: Any) -> None:
        super().__init__(config, output)
        self.targets: list[int] = []

    def status(self) -> MemoryStatus:
        pages = self.config.memory // 4096
        return MemoryStatus(pages, pages, 0, pages, 0, pages)

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        self.targets.append(target_bytes)
        return {}


def test_the_balancer_holds_dynamic_memory_operations_while_a_vm_migrates(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    a.vmms._worker_factory = _HungryDmWorker  # type: ignore[assignment]
    _running_vm(a, dynamic_memory=True, maximum="2G")
    worker = a.vmms._vms["vm1"].worker
    assert isinstance(worker, _HungryDmWorker)
    migrator.outcome = lambda w, addr: (_ for _ in ()).throw(
        MigrationError("the destination aborted: injected", "pass2")
    )
    rec = _migrate(a, b)
    assert migrator.running.wait(5)
    for _ in range(3):
        a.vmms.balancer.tick()
    assert worker.targets == []  # no add while it migrates, though its guest is at 100 %
    migrator.gate.set()
    failed = _until_final(a, rec["id"])
    assert failed["state"] == "failed" and "injected" in failed["error"]
    a.vmms.balancer.tick()
    assert worker.targets and worker.targets[0] > 512 * MIB  # the balancer takes it over again


def test_a_wrong_destination_token_fails_cleanly_the_vm_runs_on_at_the_source(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    free_b = b.free()
    _running_vm(a)
    rec = _until_final(a, _migrate(a, b, token="not-the-token")["id"])
    assert rec["state"] == "failed" and "refused the token (401)" in rec["error"]
    assert a.client.request("GET", "/api/vms/vm1")["state"] == "running"
    assert a.client.request("GET", "/api/vms/vm1")["migration"] is None
    assert b.names() == [] and b.free() == free_b and not migrator.calls


def test_a_destination_without_enough_memory_refuses_and_holds_nothing(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    free_b = b.free()  # 1.5 GiB
    _running_vm(a, memory="2G")
    rec = _until_final(a, _migrate(a, b)["id"])
    assert rec["state"] == "failed" and "not enough host memory for 2G" in rec["error"]
    assert a.client.request("GET", "/api/vms/vm1")["state"] == "running"
    assert b.names() == [] and b.free() == free_b and not FakeIncoming.instances


def test_a_migration_failing_midway_leaves_the_source_running_and_the_destination_empty(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    free_a, free_b = a.free(), b.free()
    _running_vm(a)
    migrator.outcome = lambda w, addr: (_ for _ in ()).throw(
        MigrationError("migration failed during pass2: the connection was lost", "pass2")
    )
    migrator.gate.set()
    rec = _until_final(a, _migrate(a, b)["id"])
    assert rec["state"] == "failed" and "pass2" in rec["error"]
    assert a.client.request("GET", "/api/vms/vm1")["state"] == "running"
    assert a.free() == free_a - 512 * MIB
    # the cancelled incoming worker's watcher drops the entry
    wait_for(lambda: not b.names() and b.free() == free_b, 10, "B without the VM", 0.02)
    assert b.client.request("GET", f"/api/migrations/{rec['remote_id']}")["state"] == "failed"


def _in_doubt(arrive: bool) -> Callable[[Any, tuple[str, int]], dict[str, Any]]:
    def outcome(worker: Any, address: tuple[str, int]) -> dict[str, Any]:
        incoming = next(i for i in FakeIncoming.instances if i.address == address)
        if arrive:
            incoming.arrive()  # COMMIT got there: the VM runs at the destination
        else:
            incoming.close()  # it did not: the destination gave up
        err = MigrationInDoubt("connection lost after COMMIT", "commit")
        err.migration_id = 7  # type: ignore[attr-defined]
        raise err

    return outcome


def test_a_connection_lost_after_commit_stops_the_source_when_the_destination_runs_the_vm(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    _running_vm(a)
    migrator.outcome = _in_doubt(arrive=True)
    migrator.gate.set()
    rec = _until_final(a, _migrate(a, b)["id"])
    assert rec["state"] == "done" and "confirmed the VM runs there" in rec["error"]
    assert migrator.decisions == [False]
    assert "vm1" not in a.names()
    assert b.client.request("GET", "/api/vms/vm1")["state"] == "running"


def test_a_connection_lost_after_commit_resumes_the_source_when_the_destination_has_not_it(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    _running_vm(a)
    migrator.outcome = _in_doubt(arrive=False)
    migrator.gate.set()
    rec = _until_final(a, _migrate(a, b)["id"])
    assert rec["state"] == "failed" and "does not run the VM: resumed here" in rec["error"]
    assert migrator.decisions == [True]
    assert a.client.request("GET", "/api/vms/vm1")["state"] == "running"
    wait_for(lambda: not b.names(), 10, "B without the VM", 0.02)


@pytest.mark.parametrize("resume", [True, False], ids=["resumed_here", "gone_from_here"])
def test_a_source_that_cannot_ask_the_destination_keeps_the_vm_paused_until_it_is_settled(
    hosts: tuple[Host, Host, FakeMigrator], resume: bool
) -> None:
    a, b, migrator = hosts
    _running_vm(a)

    def unreachable(worker: Any, address: tuple[str, int]) -> dict[str, Any]:
        b.servers.close()  # the destination VMMS is gone
        err = MigrationInDoubt("connection lost after COMMIT", "commit")
        err.migration_id = 7  # type: ignore[attr-defined]
        raise err

    migrator.outcome = unreachable
    migrator.gate.set()
    rec = _until_final(a, _migrate(a, b)["id"])
    assert rec["state"] == "in-doubt" and "stays PAUSED here" in rec["error"]
    assert migrator.decisions == []  # neither resumed nor stopped
    vm = a.client.request("GET", "/api/vms/vm1")
    assert vm["state"] == "paused" and "never on both hosts" in vm["reason"]
    # The administrator looked at the destination and settles it.
    with pytest.raises(ClientError) as err:
        a.client.request("POST", f"/api/migrations/{rec['id']}/resolve", {"resume": "yes"})
    assert err.value.status == 400
    settled = a.client.request("POST", f"/api/migrations/{rec['id']}/resolve", {"resume": resume})
    assert migrator.decisions == [resume]
    if resume:
        assert settled["state"] == "failed" and "settled: resumed here" in settled["error"]
        assert a.client.request("GET", "/api/vms/vm1")["state"] == "running"
    else:
        assert settled["state"] == "done" and "vm1" not in a.names()
    with pytest.raises(ClientError) as err:
        a.client.request("POST", f"/api/migrations/{rec['id']}/resolve", {"resume": resume})
    assert err.value.status == 409 and "not in doubt" in str(err.value)


def test_a_malformed_migrate_request_is_refused_before_anything_moves(
    hosts: tuple[Host, Host, FakeMigrator],
) -> None:
    a, b, migrator = hosts
    _running_vm(a)
    for body, words in [
        ({"destination": "nowhere", "token": "x"}, "is not HOST:PORT"),
        ({"destination": b.address}, "missing required field `token`"),
        ({"destination": b.address, "token": "x", "options": {"warp": 9}}, "unknown migration"),
        ({"destination": b.address, "token": "x", "speed": 1}, "unknown field"),
    ]:
        with pytest.raises(ClientError) as err:
            a.client.request("POST", "/api/vms/vm1/migrate", body)
        assert err.value.status == 400 and words in str(err.value)
    a.client.request("POST", "/api/vms", {"name": "off1"})
    with pytest.raises(ClientError) as err:
        _migrate(a, b, "off1")
    assert err.value.status == 409 and "only a running VM" in str(err.value)
    assert a.client.request("GET", "/api/migrations")["migrations"] == []
