"""Real VMMS hosts for tests: `pyhv vmms serve --tcp 127.0.0.1:0` processes, each in its own
state directory, driven through `pyhv vm` and the API, with the reference guest's console."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pyhv.vmms.client import ClientTls, VmmsClient
from tests.support.certs import Ca
from tests.support.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]
_sync = itertools.count()


class VmmsCli:
    """A running VMMS's state directory, driven through `pyhv vm` and its Unix-socket API."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.client = VmmsClient(socket_path=state / "vmms.sock", timeout=60)

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

    def show(self, name: str) -> dict[str, Any]:
        return json.loads(self.vm("show", name, "--json"))  # type: ignore[no-any-return]

    def console_until(self, name: str, command: str, marker: bytes, timeout: float = 60) -> bytes:
        """Type a command on the VM's console and read until `marker` (or `timeout`)."""
        with self.client.console(name) as sock:
            sock.settimeout(timeout)
            got = b""
            while b"pyhv> " not in got:  # the recent output ends with a prompt
                sock.sendall(b"\r")
                got += sock.recv(4096)
            got = b""
            sock.sendall(command.encode() + b"\r")
            deadline = time.monotonic() + timeout
            while marker not in got and time.monotonic() < deadline:
                got += sock.recv(4096)
            return got

    def wait_for_dm_report(self, name: str) -> None:
        """Until the VM's guest DM driver has reported (once a second after it negotiated)."""

        def reported() -> object:
            try:
                status = self.client.request("GET", f"/api/vms/{name}/memory")
            except Exception:  # noqa: BLE001 - 409 until the guest has reported
                return None
            return status.get("committed")

        wait_for(reported, 60, f"VM {name}'s guest DM driver reporting", interval=0.1)

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


class VmmsProcess(VmmsCli):
    """A `pyhv vmms serve --tcp 127.0.0.1:0` in its own state directory; with `ca`, over TLS
    with a certificate from that CA, asking clients for one from it too. Test hooks
    (PYHV_TEST_HOOKS=1) are on unless `test_hooks` is False. It stops its VMs when it stops
    (--stop-vms-on-exit) unless `stop_vms_on_exit` is False; `restarted()` starts another on
    the same state directory (after a kill(), say), logging to NAME.N.log."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        budget: str,
        *,
        ca: Ca | None = None,
        test_hooks: bool = True,
        tcp: str = "127.0.0.1:0",
        extra: tuple[str, ...] = (),
        wrap: tuple[str, ...] = (),
        stop_vms_on_exit: bool = True,
        env: dict[str, str] | None = None,
        generation: int = 0,
    ) -> None:
        super().__init__(tmp / name)
        self._args = (tmp, name, budget)
        self._kwargs = {
            "ca": ca, "test_hooks": test_hooks, "extra": extra, "wrap": wrap,
            "stop_vms_on_exit": stop_vms_on_exit,
        }  # fmt: skip
        self.generation = generation
        suffix = f".{generation}" if generation else ""
        self.log = open(tmp / f"{name}{suffix}.log", "w+")
        self.ca = ca
        self.tls_files: tuple[Path, Path] | None = None
        tls: list[str] = []
        if ca is not None:
            self.tls_files = ca.issue(f"host-{name}")
            cert, key = self.tls_files
            tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(ca.cert)]
        environ = {k: v for k, v in os.environ.items() if k != "PYHV_TEST_HOOKS"}
        if test_hooks:
            environ["PYHV_TEST_HOOKS"] = "1"
        environ.update(env or {})
        if stop_vms_on_exit:
            extra = ("--stop-vms-on-exit", *extra)
        self.proc = subprocess.Popen(
            [
                *wrap,  # e.g. `nsenter --net=...` (pyhv.cluster.lab)
                sys.executable,
                "-m",
                "pyhv.cli",
                "vmms",
                "serve",
                "--state-dir",
                str(self.state),
                "--tcp",
                tcp,
                "--memory-budget",
                budget,
                "--host-reserve",
                "256M",
                *tls,
                *extra,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=environ,
        )

        def served() -> str:
            assert self.proc.poll() is None, Path(self.log.name).read_text()
            m = re.search(r"https?://([\d.]+):(\d+)/", Path(self.log.name).read_text())
            if not m:
                return ""
            return f"{'127.0.0.1' if m[1] == '0.0.0.0' else m[1]}:{m[2]}"  # 0.0.0.0: loopback too

        self.address = wait_for(served, 60, "the VMMS saying where it serves")
        #: What a source VMMS needs to bring a VM here (pyhv vm migrate --token-file).
        self.token_file = self.state / "migration-token"
        self.admin_token_file = self.state / "token"

    def tcp_client(
        self, token_file: Path | None = None, tls: ClientTls | None = None
    ) -> VmmsClient:
        """A client of this VMMS's TCP API with the token in `token_file` (default the admin
        token) and `tls` (default: with a TLS VMMS, a client certificate from its CA)."""
        if tls is None and self.ca is not None:
            cert, key = self.ca.issue("test-client")
            tls = ClientTls(self.ca.cert, cert, key)
        token = (token_file or self.admin_token_file).read_text().strip()
        return VmmsClient(tcp=self.address, token=token, timeout=60, tls=tls)

    def kill(self) -> None:
        """kill -9 the VMMS (its workers are not its to take along)."""
        self.proc.kill()
        self.proc.wait()
        self.log.close()

    def restarted(self, env: dict[str, str] | None = None) -> VmmsProcess:
        """Another `pyhv vmms serve` on this state directory and TCP address (this one has
        exited), as a restarted service would be: a peer that knew it finds it again."""
        assert self.proc.poll() is not None, "stop or kill this VMMS first"
        tmp, name, budget = self._args
        return VmmsProcess(
            tmp,
            name,
            budget,
            **self._kwargs,  # type: ignore[arg-type]
            env=env,
            generation=self.generation + 1,
            tcp=self.address,
        )

    def log_text(self) -> str:
        return Path(self.log.name).read_text()

    def close(self) -> None:
        if self.proc.poll() is not None:
            if not self.log.closed:
                self.log.close()
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@contextmanager
def vmms_host(tmp: Path, budget: str = "3G") -> Iterator[VmmsProcess]:
    """One VMMS host (3G for VMs' budget) in `tmp`/state, stopped on exit."""
    host = VmmsProcess(tmp, "state", budget)
    try:
        yield host
    finally:
        host.close()


@contextmanager
def vmms_pair(tmp: Path, ca: Ca | None = None) -> Iterator[tuple[VmmsProcess, VmmsProcess]]:
    """Host A with 3G for VMs' budget, host B with 1G (768 MiB for VMs); with `ca`, both
    serve TLS with certificates from it (and speak it to each other)."""
    a = VmmsProcess(tmp, "a", "3G", ca=ca)
    try:
        b = VmmsProcess(tmp, "b", "1G", ca=ca)
        try:
            yield a, b
        finally:
            b.close()
    finally:
        a.close()


def touched(host: VmmsProcess, name: str) -> int:
    """Pages the guest's `dirty` task (task 0) has written so far."""
    m = re.search(r"task 0: .*touched (\d+) pages", host.shell(name, "tasks", b"task 0"))
    assert m, "the dirty task is not there"
    return int(m[1])


def migrate_api(
    a: VmmsProcess, b: VmmsProcess, name: str, faults: dict[str, str]
) -> dict[str, Any]:
    """Migrate `name` from A to B through A's API with test faults; the final record."""
    rec = a.client.request(
        "POST",
        f"/api/vms/{name}/migrate",
        {
            "destination": b.address,
            "token": b.token_file.read_text().strip(),
            "options": {"faults": faults},
        },
    )

    def ended() -> dict[str, Any] | None:
        r: dict[str, Any] = a.client.request("GET", f"/api/migrations/{rec['id']}")
        return r if r["state"] in ("done", "failed", "in-doubt") else None

    return wait_for(ended, 120, f"migration {rec['id']} ending")


def recorded_workers(state: Path) -> list[dict[str, Any]]:
    """The worker records a VMMS keeps in STATE/run (pyhv.vmms.adoption)."""
    return [json.loads(p.read_text()) for p in sorted((state / "run").glob("*.json"))]


def kill_recorded_workers(state: Path) -> None:
    """Clean-up after a test that killed a VMMS: SIGKILL every worker recorded in `state` that
    still runs (same pid and start time)."""
    from pyhv.vmms.adoption import WorkerRecord, alive

    for raw in recorded_workers(state):
        rec = WorkerRecord.from_dict(raw)
        if alive(rec):
            try:
                os.kill(rec.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def worker_pids(state: Path, name: str) -> list[int]:
    """Worker processes on this host holding VM `name`'s adoption socket of the VMMS in `state`
    (its listening socket's inode in /proc/net/unix, then each process's fds): how many copies
    of the VM run under that state directory, whatever any VMMS says."""
    path = str(state / "run" / f"{name}.sock")
    inodes = set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 8 and parts[7] == path:
            inodes.add(f"socket:[{parts[6]}]")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"pyhv.worker" not in (entry / "cmdline").read_bytes():
                continue
            fds = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
        except OSError:
            continue
        if fds & inodes:
            pids.append(int(entry.name))
    return sorted(pids)
