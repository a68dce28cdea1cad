"""A real etcd for cluster tests: `etcd_server(tmp)` starts Debian's etcd (etcd-server 3.4,
/usr/bin/etcd) on free loopback ports with its data in `tmp`, waits until it answers, and stops
it on exit. It can be paused (SIGSTOP) and resumed, as a host cut off from its store sees it."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support.wait import wait_for


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EtcdServer:
    """One etcd member; `endpoint` is its client URL (http://127.0.0.1:PORT)."""

    def __init__(self, tmp: Path, host: str = "127.0.0.1") -> None:
        binary = shutil.which("etcd") or (
            "/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None
        )
        if binary is None:
            raise AssertionError(
                "etcd is not installed: `apt-get install etcd-server` (Debian's etcd 3.4) "
                "for the cluster tests"
            )
        self.binary = binary
        self.dir = tmp / "etcd"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.peer = _free_port()
        self.endpoint = f"http://{host}:{_free_port()}"  # host: e.g. a lab's bridge
        self.log = open(self.dir / "etcd.log", "a+")
        self._start()

    def _start(self) -> None:
        peer = f"http://127.0.0.1:{self.peer}"
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--name=test",
                f"--data-dir={self.dir / 'data'}",
                f"--listen-client-urls={self.endpoint}",
                f"--advertise-client-urls={self.endpoint}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=test={peer}",
                "--log-level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.healthy, 30, f"etcd answering at {self.endpoint}", interval=0.1)

    def restart(self) -> None:
        """Stop etcd (SIGTERM; resumed first if paused) and start it again on the same ports and
        data."""
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        self.proc.wait(10)
        self._start()

    def healthy(self) -> bool:
        assert self.proc.poll() is None, (self.dir / "etcd.log").read_text()[-2000:]
        try:
            r = httpx.get(self.endpoint + "/health", timeout=1)
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("health") == "true"

    def pause(self) -> None:
        """SIGSTOP: etcd holds its sockets but answers nothing (a host cut off sees this)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@contextmanager
def etcd_server(tmp: Path, host: str = "127.0.0.1") -> Iterator[EtcdServer]:
    server = EtcdServer(tmp, host)
    try:
        yield server
    finally:
        server.close()
