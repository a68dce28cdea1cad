"""Workers outlive their VMMS (issue 11, finding 4): real `pyhv vmms serve` processes and real
guests. A VMMS killed with SIGKILL (or stopped with SIGTERM, which leaves VMs running as
Hyper-V's VMMS service stop does) is started again on the same state directory: it re-adopts
the running worker (same pid, console answers, balancing and the memory cgroup go on); a worker
that refuses adoption (wrong secret) is reported and not adopted, never started twice; a worker
that ended while nobody owned it is marked off with why."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.wait import wait_for
from tests.vmms.vmms_process import (
    VmmsProcess,
    kill_recorded_workers,
    recorded_workers,
    worker_pids,
)

pytestmark = pytest.mark.guest

MIB = 1 << 20


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[list[VmmsProcess]]:
    """The VMMS generations of one state directory (the test appends restarts); every one
    is stopped and every recorded worker killed at the end."""
    gens: list[VmmsProcess] = []
    try:
        yield gens
    finally:
        for h in reversed(gens):
            h.close()
        if gens:
            kill_recorded_workers(gens[0].state)


def _counter(host: VmmsProcess, name: str) -> float:
    counters = host.client.request("GET", "/api/counters")["counters"]
    return counters[f"\\pyhv Worker Adoption\\{name}"]  # type: ignore[no-any-return]


def _assigned(host: VmmsProcess, name: str, size: int) -> dict[str, int] | None:
    s = host.client.request("GET", f"/api/vms/{name}/memory")
    return s if s["assigned"] == size else None  # type: ignore[no-any-return]


def test_a_vmms_killed_with_sigkill_re_adopts_its_jailed_worker_whose_vm_answers_and_balances(
    tmp_path: Path, hosts: list[VmmsProcess]
) -> None:
    assert os.geteuid() == 0, "run the suite as root: workers are jailed only then"
    a = VmmsProcess(tmp_path, "state", "3G")
    hosts.append(a)
    a.vm("create", "dm", "--memory", "512M", "--dynamic", "--minimum", "256M", "--maximum", "1G")
    a.vm("start", "dm")
    a.wait_for_dm_report("dm")
    before = a.show("dm")
    pid, uid = before["pid"], before["jail_uid"]
    assert uid is not None and worker_pids(a.state, "dm") == [pid]
    free_before = a.free()
    a.shell("dm", "ticks", b"ticks: ")

    a.kill()
    # Nobody owns the worker now: its VM runs on.
    assert worker_pids(a.state, "dm") == [pid]
    b = a.restarted()
    hosts.append(b)
    after = b.show("dm")
    assert after["state"] == "running", after
    assert after["pid"] == pid and after["jail_uid"] == uid
    assert after["uptime_s"] >= before["uptime_s"]  # the worker's, not the new VMMS's
    # The pool counts its memory again; its cgroup is the one it was started in.
    assert b.free() == free_before
    assert after["enforcement"]["cgroup_limit"] == 512 * MIB + after["enforcement"]["overhead"]
    # Its console answers through the new VMMS, ticking on from before.
    assert b.ticks("dm") > 0
    # Balancing goes on: a target reached through the new owner, the cgroup limit following.
    assert "memory target 384M sent" in b.vm("memory", "dm", "--target", "384M")
    wait_for(lambda: _assigned(b, "dm", 384 * MIB), 60, "dm assigned 384M after re-adoption")
    wait_for(
        lambda: (
            b.show("dm")["enforcement"]["cgroup_limit"]
            == 384 * MIB + after["enforcement"]["overhead"]
        ),
        30,
        "the cgroup limit following the assigned memory",
    )
    assert _counter(b, "Workers Adopted") == 1
    # A stop through the new VMMS stops the adopted worker for good.
    b.vm("stop", "dm")
    assert b.state_of("dm") == "off"
    wait_for(lambda: worker_pids(a.state, "dm") == [], 30, "the worker gone")
    assert recorded_workers(a.state) == []


def test_a_vmms_stopped_with_sigterm_leaves_its_unjailed_vm_running_for_the_next_one(
    tmp_path: Path, hosts: list[VmmsProcess]
) -> None:
    a = VmmsProcess(tmp_path, "state", "3G", extra=("--no-jail",), stop_vms_on_exit=False)
    hosts.append(a)
    a.vm("create", "g", "--memory", "128M")
    a.vm("start", "g")
    pid = a.show("g")["pid"]
    a.shell("g", "ticks", b"ticks: ")
    a.proc.send_signal(signal.SIGTERM)  # the default: the VMs run on (Hyper-V's service stop)
    assert a.proc.wait(60) == 0
    assert "the running VMs run on" in a.log_text()
    assert worker_pids(a.state, "g") == [pid]
    b = a.restarted()  # its VMs outlive it too: the fixture kills the recorded workers
    hosts.append(b)
    shown = b.show("g")
    assert shown["state"] == "running" and shown["pid"] == pid, shown
    assert b.ticks("g") > 0  # the guest's own answer, through the new VMMS


def test_a_worker_that_refuses_adoption_is_reported_and_one_that_ended_unowned_is_marked_off(
    tmp_path: Path, hosts: list[VmmsProcess]
) -> None:
    a = VmmsProcess(tmp_path, "state", "3G")
    hosts.append(a)
    a.vm("create", "g", "--memory", "128M")
    a.vm("start", "g")
    pid = a.show("g")["pid"]
    a.kill()
    # The record's secret is not the one the worker was started with.
    path = a.state / "run" / "g.json"
    rec = json.loads(path.read_text())
    rec["secret"] = "x" * 43
    path.write_text(json.dumps(rec))
    b = a.restarted()
    hosts.append(b)
    shown = b.show("g")
    assert shown["state"] == "crashed" and shown["pid"] is None, shown
    assert "refused adoption: the adoption secret is wrong" in shown["reason"], shown
    assert "still runs" in shown["reason"]
    assert worker_pids(a.state, "g") == [pid]  # not adopted, and not killed either
    out = b.vm("start", "g", check=False)
    assert f"still runs in a worker this VMMS could not adopt (pid {pid})" in out
    assert _counter(b, "Adoptions Refused") == 1

    # The operator stops that worker; with no VMMS owning it, the next one finds it gone.
    b.kill()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: worker_pids(a.state, "g") == [], 30, "the refused worker gone")
    c = b.restarted()
    hosts.append(c)
    shown = c.show("g")
    assert shown["state"] == "off", shown
    assert f"its worker (pid {pid}) ended while no VMMS owned it" in shown["reason"]
    assert recorded_workers(a.state) == []
    c.vm("start", "g")
    assert c.state_of("g") == "running"
