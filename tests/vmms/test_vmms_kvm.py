"""`pyhv vmms serve` with real VMs under KVM, driven by the `pyhv vm` commands: each VM runs in a
worker process of its own; a worker killed with SIGKILL is reported crashed, its memory goes back
to the pool, and the other VM's shell still answers."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.wait import wait_for
from tests.vmms.vmms_process import ROOT, VmmsProcess, vmms_host

MIB = 1 << 20

pytestmark = pytest.mark.guest

GIB = 1 << 30


@pytest.fixture
def host(tmp_path: Path) -> Iterator[VmmsProcess]:
    with vmms_host(tmp_path) as h:
        yield h


def test_a_vm_is_created_started_listed_shown_stopped_and_deleted_through_the_cli(
    host: VmmsProcess,
) -> None:
    out = host.vm("create", "testvm", "--memory", "256M", "--vps", "1")
    assert "testvm: off" in out
    out = host.vm("create", "bad", "--memory", "12X", check=False)
    assert "memory size '12X' is not understood" in out
    out = host.vm("start", "testvm")
    assert "testvm: running" in out
    vm = host.show("testvm")
    assert vm["state"] == "running" and vm["pid"] > 0 and vm["memory"]["assigned"] == 256 << 20
    os.kill(vm["pid"], 0)  # the worker is a process of its own
    assert b"committed:" in host.console_until("testvm", "mem", b"committed:")
    listing = host.vm("list")
    assert "testvm" in listing and "running" in listing
    out = host.vm("stop", "testvm")
    assert "testvm: off" in out
    out = host.vm("delete", "testvm")
    assert "deleted testvm" in out
    assert "testvm" not in host.vm("list")


def test_a_worker_killed_with_sigkill_is_reported_and_the_other_vm_keeps_running(
    host: VmmsProcess,
) -> None:
    for name in ("victim", "survivor"):
        host.vm("create", name, "--memory", "256M")
        host.vm("start", name)
    free_running = host.client.request("GET", "/api/host")["free"]
    victim = host.show("victim")
    os.kill(victim["pid"], signal.SIGKILL)
    victim = wait_for(
        lambda: (v := host.show("victim"))["state"] != "running" and v, 60, "victim not running"
    )
    assert victim["state"] == "crashed"
    assert "killed by SIGKILL" in victim["reason"]
    assert "crashed" in host.vm("list")
    assert host.show("survivor")["state"] == "running"
    assert b"committed:" in host.console_until("survivor", "mem", b"committed:")
    counters = host.client.request("GET", "/api/counters")["counters"]
    assert counters[r"\Hyper-V Virtual Machine Health Summary\Health Critical"] == 1
    assert host.client.request("GET", "/api/host")["free"] == free_running + (256 << 20)


def test_the_console_command_attaches_and_ctrl_a_x_detaches_leaving_the_vm_running(
    host: VmmsProcess,
) -> None:
    host.vm("create", "c", "--memory", "128M")
    host.vm("start", "c")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhv.cli", "vm", "--state-dir", str(host.state), "console", "c"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdin is not None and proc.stdout is not None
    got = b""
    deadline = time.monotonic() + 60
    for typed, marker in ((b"", b"pyhv> "), (b"mem\r", b"committed:")):
        proc.stdin.write(typed)  # once the shell is there: input before it may be lost
        proc.stdin.flush()
        while marker not in got and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1)
            if ready:
                got += os.read(proc.stdout.fileno(), 4096)
    proc.stdin.write(b"\x01x")
    proc.stdin.flush()
    assert proc.wait(30) == 0
    assert b"committed:" in got
    assert host.show("c")["state"] == "running"


def test_a_memory_target_balloons_the_guest_through_the_vmms(host: VmmsProcess) -> None:
    host.vm("create", "dm", "--memory", "512M", "--dynamic", "--minimum", "256M", "--maximum", "1G")
    out = host.vm("memory", "dm", "--target", "384M", check=False)
    assert "VM 'dm' is off: start it first" in out
    host.vm("start", "dm")
    host.wait_for_dm_report("dm")
    out = host.vm("memory", "dm", "--target", "384M")
    assert "memory target 384M sent" in out
    status = wait_for(
        lambda: (
            (s := host.client.request("GET", "/api/vms/dm/memory"))["assigned"] == 384 << 20 and s
        ),
        60,
        "dm assigned 384M",
    )
    assert status["assigned"] == 384 << 20 and status["ballooned"] == 128 << 20
    # the pool follows at the balancer's next tick
    wait_for(lambda: host.show("dm")["memory"]["ballooned"] == 128 << 20, 30, "the pool's 128M")
    assert "dm: visible 512M assigned 384M ballooned 128M committed" in host.vm("memory", "dm")
    out = host.vm("memory", "dm", "--maximum", "512M", check=False)
    assert "maximum can only go up while VM 'dm' runs" in out


def test_a_maximum_raised_while_the_vm_runs_lets_it_be_given_more_than_its_old_maximum(
    host: VmmsProcess,
) -> None:
    host.vm(
        "create", "dm", "--memory", "512M", "--dynamic", "--minimum", "256M", "--maximum", "512M"
    )
    host.vm("start", "dm")
    host.wait_for_dm_report("dm")
    host.vm("memory", "dm", "--maximum", "768M")
    assert host.show("dm")["settings"]["maximum"] == 768 << 20
    # The worker clamps targets to the new range: 640M is above the maximum it booted with.
    assert "memory target 640M sent" in host.vm("memory", "dm", "--target", "640M")
    status = wait_for(
        lambda: (
            (s := host.client.request("GET", "/api/vms/dm/memory"))["assigned"] == 640 << 20 and s
        ),
        60,
        "dm assigned 640M",
    )
    assert status["assigned"] == 640 << 20 and status["visible"] == 640 << 20, status
    # The guest was told the new maximum (the info message, in 4 KiB pages).
    out = host.console_until("dm", "dm", b"max-page-count: 196608")
    assert b"max-page-count: 196608" in out, out


@pytest.mark.unit
def test_the_vm_commands_say_when_no_vmms_is_serving(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pyhv.cli", "vm", "--state-dir", str(tmp_path), "list"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 1
    assert "no VMMS is serving on" in r.stderr and "pyhv vmms serve" in r.stderr
    assert "Traceback" not in r.stderr


def test_testlimit_is_answered_by_a_hot_add_with_the_buffer_which_a_crash_returns_to_the_pool(
    host: VmmsProcess,
) -> None:
    host.vm(
        "create", "testvm", "--memory", "256M", "--dynamic", "--minimum", "128M", "--maximum", "2G"
    )
    host.vm("start", "testvm")
    out = host.console_until("testvm", "testlimit -m 400 -c 1", b"committed 400 MiB")
    assert b"committed 400 MiB" in out
    vm = r"\Hyper-V Dynamic Memory VM(testvm)"

    def hot_added() -> tuple[dict[str, float], dict[str, Any]] | None:
        counters = host.client.request("GET", "/api/counters")["counters"]
        status = host.client.request("GET", "/api/vms/testvm/memory")
        # Demand plus the 20 % buffer (changes under 1 MiB are not worth an operation).
        committed = status["committed"] or 0
        # The counters follow at the balancer's look after the status that shows the add.
        # What was added is what took it from its 256 MiB startup to demand + buffer (demand:
        # the 400 MiB committed plus the guest's balloon floor, which hot-adds do not raise).
        want_mib = (committed * 1.2 - (1 << 20)) / MIB - 256
        added = counters.get(vm + r"\Memory Add Operations", 0) >= 1
        added = added and counters.get(vm + r"\Added Memory", 0) >= want_mib
        if added and committed >= 400 << 20 and status["visible"] >= committed * 1.2 - (1 << 20):
            return counters, status
        return None

    # the guest reports once a second; the balancer ticks once a second
    counters, status = wait_for(hot_added, 60, "a hot-add with its buffer, counted", 0.1)
    assert status["committed"] >= 400 << 20
    assert status["visible"] >= status["committed"] * 1.2 - (1 << 20)
    assert counters[vm + r"\Memory Add Operations"] >= 1
    added_mib = counters[vm + r"\Added Memory"]
    assert added_mib >= (status["committed"] * 1.2 - (1 << 20)) / MIB - 256
    # the pool follows the worker at the balancer's next tick
    wait_for(
        lambda: host.show("testvm")["memory"]["visible"] >= (256 + int(added_mib)) << 20,
        30,
        "the pool following the worker's hot-add",
    )
    # Killed, the VM gives everything back, hot-added memory included.
    os.kill(host.show("testvm")["pid"], signal.SIGKILL)
    wait_for(lambda: host.show("testvm")["state"] == "crashed", 60, "testvm crashed")
    pool = host.client.request("GET", "/api/host")
    assert pool["free"] == pool["budget"] - pool["reserve"] and pool["running_vms"] == 0
