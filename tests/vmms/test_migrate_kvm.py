"""`pyhv vm migrate` between two `pyhv vmms serve` instances (separate state directories, TCP on
127.0.0.1) with the reference guest under KVM: the VM moves while its `dirty` task writes, runs
at the destination (its shell answers, its clock goes on), and is gone at the source, whose pool
got the memory back; a wrong token or a destination without the memory fails cleanly; the
connection lost after COMMIT is settled by asking the destination VMMS."""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.vmms.client import VmmsClient

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
_sync = itertools.count()


class Vmms:
    """A `pyhv vmms serve --tcp 127.0.0.1:0` in its own state directory."""

    def __init__(self, tmp: Path, name: str, budget: str) -> None:
        self.state = tmp / name
        self.log = open(tmp / f"{name}.log", "w+")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyhv.cli",
                "vmms",
                "serve",
                "--state-dir",
                str(self.state),
                "--tcp",
                "127.0.0.1:0",
                "--memory-budget",
                budget,
                "--host-reserve",
                "256M",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        self.address = ""
        for _ in range(600):
            m = re.search(r"http://(127\.0\.0\.1:\d+)/", Path(self.log.name).read_text())
            if m:
                self.address = m[1]
                break
            assert self.proc.poll() is None, Path(self.log.name).read_text()
            time.sleep(0.05)
        assert self.address, "the VMMS did not say where it serves"
        self.token_file = self.state / "token"
        self.client = VmmsClient(socket_path=self.state / "vmms.sock", timeout=60)

    def vm(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(
            [sys.executable, "-m", "pyhv.cli", "vm", "--state-dir", str(self.state), *args],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert "Traceback" not in r.stderr, r.stderr
        if check:
            assert r.returncode == 0, r.stdout + r.stderr
        else:
            assert r.returncode != 0, r.stdout + r.stderr
        return r.stdout + r.stderr

    def free(self) -> int:
        return int(self.client.request("GET", "/api/host")["free"])

    def names(self) -> list[str]:
        return [vm["name"] for vm in self.client.request("GET", "/api/vms")["vms"]]

    def state_of(self, name: str) -> str:
        return str(self.client.request("GET", f"/api/vms/{name}")["state"])

    def shell(self, name: str, command: str, marker: bytes = b"pyhv> ") -> str:
        """Type a command on the VM's console; its output up to the next prompt. A unique
        word typed first (the guest calls it an unknown command) marks where the old output
        (the recent tail the console replays) ends."""
        sync = f"sync{next(_sync)}".encode()
        with self.client.console(name) as sock:
            sock.settimeout(30)
            got = b""
            sock.sendall(sync + b"\r")
            for _ in range(300):
                got += sock.recv(4096)
                if b"pyhv> " in got.partition(b"unknown command '" + sync)[2]:
                    break
            got = b""
            sock.sendall(command.encode() + b"\r")
            for _ in range(300):
                got += sock.recv(4096)
                if marker in got and got.rstrip().endswith(b"pyhv>"):
                    break
            return got.decode(errors="replace")

    def ticks(self, name: str) -> int:
        m = re.search(r"ticks: (\d+)", self.shell(name, "ticks", b"ticks: "))
        assert m, "no ticks"
        return int(m[1])

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Vmms, Vmms]]:
    a = Vmms(tmp_path, "a", "3G")
    try:
        b = Vmms(tmp_path, "b", "1G")  # 768 MiB for VMs
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


def _touched(host: Vmms, name: str) -> int:
    m = re.search(r"task 0: .*touched (\d+) pages", host.shell(name, "tasks", b"task 0"))
    assert m, "the dirty task is not there"
    return int(m[1])


def test_pyhv_vm_migrate_moves_a_running_vm_to_another_vmms_where_its_shell_answers(
    hosts: tuple[Vmms, Vmms],
) -> None:
    a, b = hosts
    free_a, free_b = a.free(), b.free()
    a.vm("create", "mover", "--memory", "256M")
    a.vm("start", "mover")
    assert "dirty" in a.shell("mover", "dirty 16")
    for _ in range(100):  # until the task has written its working set once
        if _touched(a, "mover") >= 16 * 256:
            break
        time.sleep(0.05)
    before = a.ticks("mover")
    out = a.vm("migrate", "mover", "--to", b.address, "--token-file", str(b.token_file))
    assert "migrated in" in out and f"mover runs on {b.address} now" in out, out
    assert re.search(r"done \[#+\] sent", out), out  # the progress bar's last line
    # B runs it, A has forgotten it and its pool has the memory back.
    listing = b.vm("list")
    assert re.search(r"mover\s+running", listing), listing
    assert "mover" not in a.vm("list") and "mover" not in a.names()
    assert a.free() == free_a and b.free() == free_b - 256 * MIB
    after = b.ticks("mover")
    assert after > before
    touched = _touched(b, "mover")
    assert b.ticks("mover") > after  # its clock goes on there
    for _ in range(100):
        if _touched(b, "mover") > touched:
            break
        time.sleep(0.05)
    assert _touched(b, "mover") > touched  # and its dirty task goes on writing
    b.vm("stop", "mover")
    assert b.free() == free_b


def test_a_wrong_token_a_destination_without_the_memory_or_a_cut_leave_the_vm_running_at_the_source(
    hosts: tuple[Vmms, Vmms],
) -> None:
    a, b = hosts
    free_b = b.free()
    a.vm("create", "stay", "--memory", "1G")
    a.vm("start", "stay")
    wrong = a.vm("migrate", "stay", "--to", b.address, "--token", "not-the-token", check=False)
    assert "refused the token (401)" in wrong
    full = a.vm(
        "migrate", "stay", "--to", b.address, "--token-file", str(b.token_file), check=False
    )
    assert "not enough host memory for 1G on the destination" in full
    for _ in (wrong, full):
        assert a.state_of("stay") == "running"
    assert "ticks: " in a.shell("stay", "ticks", b"ticks: ")
    assert b.names() == [] and b.free() == free_b
    # A connection cut in the middle of the first pass: the VM runs on at A, B drops it all.
    a.vm("create", "cut", "--memory", "256M")
    a.vm("start", "cut")
    rec = _migrate_api(a, b, "cut", {"pass1": "cut"})
    assert rec["state"] == "failed" and "during pass1" in rec["error"], rec
    assert a.state_of("cut") == "running" and a.ticks("cut") > 0
    for _ in range(100):
        if not b.names() and b.free() == free_b:
            break
        time.sleep(0.05)
    assert b.names() == [] and b.free() == free_b


def _migrate_api(a: Vmms, b: Vmms, name: str, faults: dict[str, str]) -> dict[str, Any]:
    rec = a.client.request(
        "POST",
        f"/api/vms/{name}/migrate",
        {
            "destination": b.address,
            "token": b.token_file.read_text().strip(),
            "options": {"faults": faults},
        },
    )
    for _ in range(600):
        rec = a.client.request("GET", f"/api/migrations/{rec['id']}")
        if rec["state"] in ("done", "failed", "in-doubt"):
            return rec  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"the migration did not end: {rec}")


def test_a_connection_lost_after_commit_is_settled_by_asking_the_destination_vmms(
    hosts: tuple[Vmms, Vmms],
) -> None:
    a, b = hosts
    free_a, free_b = a.free(), b.free()
    a.vm("create", "doubt", "--memory", "256M")
    a.vm("start", "doubt")
    # Cut before COMMIT went out: the destination never resumed it, so the source does.
    rec = _migrate_api(a, b, "doubt", {"commit": "cut"})
    assert rec["state"] == "failed" and "does not run the VM: resumed here" in rec["error"], rec
    assert a.state_of("doubt") == "running" and a.ticks("doubt") > 0
    for _ in range(100):
        if not b.names():
            break
        time.sleep(0.05)
    assert b.names() == [] and b.free() == free_b
    # Cut after COMMIT went out, before RESUMED was read: it runs at the destination, so the
    # source stops its paused copy (never running on both).
    rec = _migrate_api(a, b, "doubt", {"resumed": "cut"})
    assert rec["state"] == "done" and "confirmed the VM runs there" in rec["error"], rec
    assert b.state_of("doubt") == "running" and b.ticks("doubt") > 0
    assert "doubt" not in a.names() and a.free() == free_a


def test_a_dynamic_memory_vm_moved_by_the_vmms_is_balanced_by_the_destination_vmms(
    hosts: tuple[Vmms, Vmms],
) -> None:
    a, b = hosts
    free_b = b.free()
    a.vm("create", "dm1", "--memory", "256M", "--dynamic", "--minimum", "128M", "--maximum", "1G")
    a.vm("start", "dm1")
    for _ in range(100):  # its guest's DM driver has reported to A
        if a.client.request("GET", "/api/vms/dm1/memory")["committed"] is not None:
            break
        time.sleep(0.1)
    out = a.vm("migrate", "dm1", "--to", b.address, "--token-file", str(b.token_file))
    assert f"dm1 runs on {b.address} now" in out, out
    assert b.free() == free_b - 256 * MIB
    # B's balancer answers the guest's new demand with a hot-add from B's pool.
    assert "committed 300 MiB" in b.shell("dm1", "testlimit -m 300 -c 1", b"committed 300 MiB")
    status: dict[str, Any] = {}
    for _ in range(200):  # reports once a second, a few Add operations as they catch up
        status = b.client.request("GET", "/api/vms/dm1/memory")
        committed = status["committed"] or 0
        if committed >= 300 * MIB and status["visible"] >= committed * 1.2 - MIB:
            break
        time.sleep(0.1)
    assert status["visible"] >= (status["committed"] or 0) * 1.2 - MIB > 300 * MIB
    for _ in range(50):  # the pool follows the worker at B's next tick
        if b.free() < free_b - 300 * MIB:
            break
        time.sleep(0.1)
    assert b.free() < free_b - 300 * MIB
    b.vm("stop", "dm1")
    assert b.free() == free_b
