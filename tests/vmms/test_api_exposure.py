"""The VMMS API as an attacker before authentication, and a careless operator, would meet it
(issue 11, findings 6 and 7), against real `pyhv vmms serve` processes: 2000 idle connections
neither exhaust its threads nor its file descriptors, and an authenticated `pyhv vm create`
still succeeds; a client that trickles its request head or its body is dropped; a token in the
URL is refused; the migration token can only bring a VM in; a client certificate from another
CA is refused; TCP beyond loopback needs TLS; the migration test hooks need the test switch."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhv.vmms.client import ClientError, ClientTls, VmmsClient
from tests.support.certs import Ca, make_ca
from tests.support.wait import wait_for
from tests.vmms.vmms_process import ROOT, VmmsProcess

pytestmark = pytest.mark.unit


@pytest.fixture
def host(tmp_path: Path) -> Iterator[VmmsProcess]:
    h = VmmsProcess(tmp_path, "state", "1G", extra=("--header-timeout", "2", "--body-timeout", "2"))
    try:
        yield h
    finally:
        h.close()


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Threads:")).split()[1])


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _pyhv_vm(host: VmmsProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyhv.cli", "vm", "--tcp", host.address, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYHV_VMMS_TOKEN": host.admin_token_file.read_text().strip()},
    )


def _closed(sock: socket.socket) -> bool:
    """True once the peer closed `sock` (EOF or reset), False while it is open."""
    sock.setblocking(False)
    try:
        return sock.recv(65536) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


def _http(host: VmmsProcess, request: bytes) -> tuple[int, str]:
    h, _, p = host.address.rpartition(":")
    with socket.create_connection((h, int(p)), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def test_2000_idle_connections_cost_no_thread_and_an_authenticated_create_still_succeeds(
    host: VmmsProcess,
) -> None:
    pid = host.proc.pid
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    threads_before = _threads(pid)
    h, _, p = host.address.rpartition(":")
    idle: list[socket.socket] = []
    try:
        for _ in range(2000):
            idle.append(socket.create_connection((h, int(p)), timeout=10))
        # The VMMS has taken every one of them (or evicted the oldest at its cap of 1024).
        wait_for(lambda: _fds(pid) >= 1000, 60, "the VMMS accepting the idle connections")
        r = _pyhv_vm(host, "create", "under-siege", "--memory", "256M")
        assert r.returncode == 0 and "under-siege: off" in r.stdout, r.stdout + r.stderr
        threads = _threads(pid)
        fds = _fds(pid)
        print(f"2000 idle connections: VMMS threads {threads_before} -> {threads}, fds {fds}")
        # No thread per connection (the old server had 2000 more), fds within the cap.
        assert threads <= threads_before + 20, (threads_before, threads)
        assert fds <= 1024 + 100, fds
    finally:
        for s in idle:
            s.close()
    assert "under-siege" in host.names()
    counters = host.client.request("GET", "/api/counters")["counters"]
    assert counters[r"\pyhv VMMS API(tcp)\Connections Evicted"] >= 2000 - 1024


def test_a_client_that_trickles_its_head_or_its_body_is_dropped(host: VmmsProcess) -> None:
    h, _, p = host.address.rpartition(":")
    head = b"GET /api/vms HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
    with socket.create_connection((h, int(p))) as s:
        sent = 0
        deadline = time.monotonic() + 60
        # One byte every 50 ms: the whole head would take 50 s; the VMMS allows 2.
        while not _closed(s) and time.monotonic() < deadline:
            s.setblocking(True)
            try:
                s.sendall(head[sent : sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += 1
            time.sleep(0.05)
        assert sent < len(head), "the slow head was not dropped"
    with socket.create_connection((h, int(p))) as silent:  # sends nothing at all
        wait_for(lambda: _closed(silent), 30, "the silent connection dropped")
    token = host.admin_token_file.read_text().strip()
    status, body = _http(
        host,
        b"POST /api/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {token}\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"name": ',
    )
    assert status == 408 and "the body did not arrive within 2 s" in json.loads(body)["error"]
    assert host.names() == []
    counters = host.client.request("GET", "/api/counters")["counters"]
    assert counters[r"\pyhv VMMS API(tcp)\Request Heads Timed Out"] == 2


def test_a_request_whose_client_half_closes_after_sending_it_is_still_answered(
    host: VmmsProcess,
) -> None:
    """A client may end its side once its request is sent (shutdown(SHUT_WR), `nc -N`): the
    answer still comes, then the connection closes; a head cut short by the EOF gets none."""
    token = host.admin_token_file.read_text().strip()
    get = b"GET /api/vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n" % token.encode()
    h, _, p = host.address.rpartition(":")
    for connect in (
        lambda: socket.create_connection((h, int(p)), timeout=30),
        lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
    ):
        for request, answers in ((get + b"\r\n", 1), (get + b"\r\n" + get + b"\r\n", 2), (get, 0)):
            with connect() as s:
                if s.family == socket.AF_UNIX:
                    s.settimeout(30)
                    s.connect(str(host.state / "vmms.sock"))
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):  # until the VMMS closes
                    data += chunk
            assert data.count(b"HTTP/1.1 200 OK") == answers, (s.family, request, data)


def test_a_token_in_the_url_is_refused_and_the_header_works(host: VmmsProcess) -> None:
    token = host.admin_token_file.read_text().strip()
    status, body = _http(
        host,
        f"GET /api/vms?token={token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status == 401
    assert "?token=) is refused" in body and "Authorization: Bearer" in body
    assert host.tcp_client().request("GET", "/api/vms") == {"vms": []}


def test_the_migration_token_can_only_bring_a_vm_in(host: VmmsProcess) -> None:
    migration = host.tcp_client(host.token_file)
    for method, path, body in [
        ("GET", "/api/vms", None),
        ("POST", "/api/vms", {"name": "x"}),
        ("GET", "/api/migrations", None),
        ("GET", "/metrics", None),
        ("POST", "/api/chart-codes", None),
    ]:
        with pytest.raises(ClientError, match="the migration token may only bring a VM in") as e:
            migration.request(method, path, body)
        assert e.value.status == 403
    counters = host.client.request("GET", "/api/counters")["counters"]
    assert counters[r"\pyhv VMMS API(tcp)\Credentials Refused"] == 5
    # The routes of bringing a VM in take it (here: a migration this VMMS does not have).
    with pytest.raises(ClientError, match="no migration 'in-1-x' on this host") as e:
        migration.request("GET", "/api/migrations/in-1-x")
    assert e.value.status == 404
    with pytest.raises(ClientError, match="no incoming migration 'in-1-x'") as e:
        migration.request("DELETE", "/api/migrations/in-1-x")
    assert e.value.status == 404
    with pytest.raises(ClientError, match=r"at `\$.settings.vps`") as e:
        migration.request("POST", "/api/migrations/incoming", {"settings": {"name": "x", "vps": 0}})
    assert e.value.status == 400
    assert host.names() == []


def test_migration_test_hooks_are_refused_without_the_test_switch(tmp_path: Path) -> None:
    host = VmmsProcess(tmp_path, "state", "1G", test_hooks=False)
    try:
        with pytest.raises(ClientError, match="options.faults is a test hook") as e:
            host.client.request(
                "POST",
                "/api/vms/any/migrate",
                {
                    "destination": "127.0.0.1:9",
                    "token": "t" * 20,
                    "options": {"faults": {"connect": "exit"}},
                },
            )
        assert e.value.status == 400 and "PYHV_TEST_HOOKS=1" in str(e.value)
    finally:
        host.close()


def _serve(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyhv.cli", "vmms", "serve", "--state-dir", str(tmp_path / "s")]
        + list(args),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_tcp_beyond_loopback_needs_tls(tmp_path: Path) -> None:
    r = _serve(tmp_path, "--tcp", "0.0.0.0:0")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "'0.0.0.0' is not a loopback address: beyond loopback the VMMS serves only with TLS" in (
        r.stderr
    )


@pytest.fixture
def tls_host(tmp_path: Path) -> Iterator[tuple[VmmsProcess, Ca]]:
    ca = make_ca(tmp_path / "ca")
    h = VmmsProcess(
        tmp_path, "state", "1G", ca=ca, tcp="0.0.0.0:0", extra=("--header-timeout", "2")
    )
    try:
        yield h, ca
    finally:
        h.close()


def test_over_tls_only_a_client_certificate_from_the_vmms_ca_is_taken(
    tls_host: tuple[VmmsProcess, Ca], tmp_path: Path
) -> None:
    host, ca = tls_host
    assert "https://0.0.0.0:" in Path(host.log.name).read_text()  # beyond loopback, with TLS
    assert host.tcp_client().request("GET", "/api/vms") == {"vms": []}
    token = host.admin_token_file.read_text().strip()
    other = make_ca(tmp_path / "other", "another CA")
    cert, key = other.issue("intruder")
    for tls, words in [
        (ClientTls(ca.cert, cert, key), "TLS|failed"),  # a certificate from another CA
        (ClientTls(ca.cert), "TLS|failed"),  # no certificate
        (ClientTls(other.cert, *ca.issue("client")), "CERTIFICATE_VERIFY_FAILED"),  # wrong CA
    ]:
        with pytest.raises(ClientError, match=words):
            VmmsClient(tcp=host.address, token=token, tls=tls, timeout=10).request(
                "GET", "/api/vms"
            )
    with pytest.raises(ClientError):  # plain HTTP to the TLS port
        VmmsClient(tcp=host.address, token=token, timeout=10).request("GET", "/api/vms")
    h, _, p = host.address.rpartition(":")
    with socket.create_connection((h, int(p))) as silent:  # never starts its handshake
        wait_for(lambda: _closed(silent), 30, "the silent TLS connection dropped")
