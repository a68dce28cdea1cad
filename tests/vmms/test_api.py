"""The VMMS API with fake workers: every malformed, wrong or unauthenticated request gets a
4xx JSON answer that says what was wrong, and nothing of it reaches a worker; a crashed worker
is reported and its memory returns to the pool; counters are served for Prometheus."""

from __future__ import annotations

import contextlib
import io
import json
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from pyhv.vmms.client import ClientError, VmmsClient
from pyhv.vmms.server import ApiServers, ServeError
from pyhv.vmms.service import Vmms
from tests.support.hostile import json_values
from tests.support.wait import wait_for
from tests.vmms.fakes import FakeDmWorker, FakeWorker

pytestmark = pytest.mark.simulation

GIB = 1 << 30


@pytest.fixture
def vmms(tmp_path: Path) -> Iterator[tuple[Vmms, ApiServers]]:
    FakeWorker.instances.clear()

    def factory(config: Any, output: Any) -> FakeWorker:
        cls = FakeDmWorker if config.name.startswith("dm") else FakeWorker
        return cls(config, output)

    service = Vmms(
        tmp_path,
        budget_bytes=4 * GIB,
        reserve_bytes=GIB // 2,
        worker_factory=factory,
        image_resolver=lambda: __file__,  # any file: fake workers boot nothing
    )
    servers = ApiServers(service, tmp_path / "vmms.sock", ("127.0.0.1", 0))
    servers.start()
    yield service, servers
    servers.close()
    service.close()


def _client(servers: ApiServers) -> VmmsClient:
    return VmmsClient(socket_path=servers.unix.path, timeout=10)


def raw(servers: ApiServers, request: bytes, tcp: bool = False) -> tuple[int, dict[str, str], Any]:
    """Send bytes as they are; the status, headers and decoded body of the answer."""
    if tcp:
        s = socket.create_connection(servers.tcp_address)  # type: ignore[arg-type]
    else:
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(servers.unix.path))
    with s:
        s.settimeout(10)
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("content-type", "").startswith("application/json"):
        return status, headers, json.loads(body)
    return status, headers, body


def request(
    method: str,
    path: str,
    body: bytes = b"",
    ctype: str = "application/json",
    extra: str = "",
) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}"
    if body or method in ("POST", "PATCH"):
        head += f"Content-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


@pytest.mark.parametrize(
    ("req", "status", "words"),
    [
        (request("POST", "/api/vms", b"{name: x}"), 400, "the body is not valid JSON"),
        (request("POST", "/api/vms", b"[1, 2]"), 400, "must be a JSON object, not list"),
        # found by the fuzz campaign (tests/fuzz): these three answered 500
        (request("POST", "/api/vms", b"[" * 5000), 400, "the body is not valid JSON"),
        (request("POST", "/api/vms", b'{"name": "x", "\\ud800": 1}'), 400, "not unicode"),
        (
            request("POST", "/api/vms", b'{"name": "x", "cmdline": "a\\ud800"}'),
            400,
            "command line 'a\\ud800' is not unicode text",
        ),
        (request("POST", "/api/vms", b'{"name": "x", "vps": NaN}'), 400, "NaN is not a JSON"),
        (request("POST", "/api/vms", b'{"name": "x"}', "text/plain"), 415, "send application/json"),
        (request("POST", "/api/vms", b""), 400, "the body is empty"),
        (b"POST /api/vms HTTP/1.1\r\nHost: x\r\n\r\n", 411, "needs a JSON body"),
        (
            b"POST /api/vms HTTP/1.1\r\nHost: x\r\nContent-Length: 9999999\r\nContent-Type: application/json\r\n\r\n",
            413,
            "too large",
        ),
        (
            b"POST /api/vms HTTP/1.1\r\nContent-Length: \xb2\r\nContent-Type: application/json\r\n\r\n",
            400,
            "bad request",
        ),
        (
            request("POST", "/api/vms", b'{"name": "x", "memory": "9Q"}'),
            400,
            "'9Q' is not understood",
        ),
        (request("POST", "/api/vms", b'{"name": "x", "weight": 500}'), 400, "0..100"),
        (
            request("POST", "/api/vms", b'{"name": "x", "extra": 1}'),
            400,
            "Object contains unknown field `extra`",
        ),
        (request("GET", "/api/nothing"), 404, "no such resource '/api/nothing'"),
        (request("GET", "/api/vms/ghost"), 404, "no VM named 'ghost'"),
        (request("PUT", "/api/vms"), 405, "PUT is not allowed on /api/vms: use GET, POST"),
        (request("POST", "/api/vms/ghost/start"), 404, "no VM named 'ghost'"),
        (request("BREW", "/"), 501, "method 'BREW' is not supported"),
        (b"garbage\r\n\r\n", 400, "bad request"),
    ],
)
def test_a_malformed_request_gets_a_clear_4xx_json_error(
    vmms: tuple[Vmms, ApiServers], req: bytes, status: int, words: str
) -> None:
    got, _, body = raw(vmms[1], req)
    assert got == status
    assert body["status"] == status and words.lower() in body["error"].lower(), body
    assert vmms[0].list() == []
    assert FakeWorker.instances == []  # nothing reached a worker


def test_tcp_without_the_bearer_token_is_refused_with_401(vmms: tuple[Vmms, ApiServers]) -> None:
    _, servers = vmms
    status, headers, body = raw(servers, request("GET", "/api/vms"), tcp=True)
    assert status == 401 and "no bearer token" in body["error"]
    assert headers["www-authenticate"].startswith("Bearer")
    status, _, body = raw(
        servers, request("GET", "/api/vms", extra="Authorization: Bearer nope\r\n"), tcp=True
    )
    assert status == 401 and "a wrong bearer token" in body["error"]
    token = (servers.vmms.store.state_dir / "token").read_text().strip()
    status, _, body = raw(
        servers, request("GET", "/api/vms", extra=f"Authorization: Bearer {token}\r\n"), tcp=True
    )
    assert status == 200 and body == {"vms": []}


def test_the_token_file_and_the_unix_socket_are_private_to_their_owner(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    service, servers = vmms
    assert stat.S_IMODE(servers.unix.path.stat().st_mode) == 0o600
    assert stat.S_IMODE((service.store.state_dir / "token").stat().st_mode) == 0o600


def test_tcp_beyond_loopback_is_refused_without_tls(
    vmms: tuple[Vmms, ApiServers], tmp_path: Path
) -> None:
    with pytest.raises(
        ServeError, match="not a loopback address: beyond loopback the VMMS serves only with TLS"
    ):
        ApiServers(vmms[0], tmp_path / "other.sock", ("0.0.0.0", 0))
    assert not (tmp_path / "other.sock").exists()


def test_a_second_vmms_on_the_same_socket_is_refused(vmms: tuple[Vmms, ApiServers]) -> None:
    with pytest.raises(ServeError, match="another VMMS already serves"):
        ApiServers(vmms[0], vmms[1].unix.path)


def test_create_start_stop_delete_through_the_api(vmms: tuple[Vmms, ApiServers]) -> None:
    service, servers = vmms
    c = _client(servers)
    vm = c.request("POST", "/api/vms", {"name": "a", "memory": "1G", "vps": 2})
    assert vm["state"] == "off" and vm["settings"]["memory"] == GIB
    with pytest.raises(ClientError, match="a VM named 'a' exists") as e:
        c.request("POST", "/api/vms", {"name": "a"})
    assert e.value.status == 409
    free = service.pool.free_pages
    vm = c.request("POST", "/api/vms/a/start")
    assert vm["state"] == "running" and vm["memory"]["assigned"] == GIB
    assert service.pool.free_pages == free - GIB // 4096
    for method, path, words in [
        ("POST", "/api/vms/a/start", "is running already"),
        ("DELETE", "/api/vms/a", "stop it first"),
        ("PATCH", "/api/vms/a", "memory cannot change while VM 'a' runs"),
    ]:
        with pytest.raises(ClientError, match=words) as e:
            c.request(method, path, {"memory": "2G"} if method == "PATCH" else None)
        assert e.value.status in (400, 409)
    assert FakeWorker.instances[0].config.memory == GIB
    vm = c.request("POST", "/api/vms/a/stop")
    assert vm["state"] == "off" and "stopped" in vm["reason"]
    assert service.pool.free_pages == free
    assert c.request("DELETE", "/api/vms/a") is None
    assert c.request("GET", "/api/vms") == {"vms": []}


def test_a_vm_that_does_not_fit_in_the_pool_does_not_start(vmms: tuple[Vmms, ApiServers]) -> None:
    c = _client(vmms[1])
    c.request("POST", "/api/vms", {"name": "big", "memory": "4G"})
    with pytest.raises(ClientError, match="not enough host memory for 4G") as e:
        c.request("POST", "/api/vms/big/start")
    assert e.value.status == 409 and FakeWorker.instances == []


def test_a_crashed_worker_is_reported_and_its_memory_returns_to_the_pool(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    service, servers = vmms
    c = _client(servers)
    free = service.pool.free_pages
    for name in ("a", "b"):
        c.request("POST", "/api/vms", {"name": name, "memory": "512M"})
        c.request("POST", f"/api/vms/{name}/start")
    a, b = FakeWorker.instances
    a.crash()
    wait_for(lambda: c.request("GET", "/api/vms/a")["state"] != "running", 10, "a not running")
    vm = c.request("GET", "/api/vms/a")
    assert vm["state"] == "crashed" and "killed by SIGKILL" in vm["reason"]
    assert c.request("GET", "/api/vms/b")["state"] == "running"
    assert service.pool.free_pages == free - (512 << 20) // 4096
    snap = c.request("GET", "/api/counters")["counters"]
    assert snap[r"\Hyper-V Virtual Machine Health Summary\Health Critical"] == 1
    assert snap[r"\Hyper-V Virtual Machine Health Summary\Health Ok"] == 1
    # A crashed VM can start again.
    assert c.request("POST", "/api/vms/a/start")["state"] == "running"


def test_memory_requests_are_checked_before_they_reach_the_worker(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    c = _client(vmms[1])
    c.request("POST", "/api/vms", {"name": "static", "memory": "512M"})
    c.request("POST", "/api/vms/static/start")
    with pytest.raises(ClientError, match="Dynamic Memory is not enabled for VM 'static'") as e:
        c.request("POST", "/api/vms/static/memory", {"target": "768M"})
    assert e.value.status == 409
    c.request("POST", "/api/vms", {"name": "dmvm", "memory": "512M", "dynamic_memory": True})
    c.request("POST", "/api/vms/dmvm/start")
    for body, words in [
        ({"target": "lots"}, "'lots' is not understood"),
        ({"target": "8G"}, "outside the Dynamic Memory range of VM 'dmvm', 256M..2G"),
        ({"target": True}, "got `bool`"),
        ({"size": "1G"}, "Object contains unknown field `size`"),
    ]:
        with pytest.raises(ClientError, match=words) as e:
            c.request("POST", "/api/vms/dmvm/memory", body)
        assert e.value.status == 400
    dm = FakeWorker.instances[-1]
    assert not hasattr(dm, "target")
    c.request("POST", "/api/vms/dmvm/memory", {"target": "768M"})
    assert dm.target == 768 << 20  # type: ignore[attr-defined]
    st = c.request("GET", "/api/vms/dmvm/memory")
    assert st["assigned"] == 512 << 20 and st["committed"] == 256 << 20


def test_a_running_vms_lowered_minimum_or_raised_maximum_reaches_its_worker(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    c = _client(vmms[1])
    c.request("POST", "/api/vms", {"name": "dmvm", "memory": "512M", "dynamic_memory": True})
    c.request("POST", "/api/vms/dmvm/start")
    dm = FakeWorker.instances[-1]
    c.request("PATCH", "/api/vms/dmvm", {"buffer": 30})
    assert not hasattr(dm, "limits")  # nothing of the range changed: the worker is not asked
    c.request("PATCH", "/api/vms/dmvm", {"maximum": "3G"})
    assert dm.limits == (256 << 20, 3 * GIB)  # type: ignore[attr-defined]
    c.request("PATCH", "/api/vms/dmvm", {"minimum": "128M"})
    assert dm.limits == (128 << 20, 3 * GIB)  # type: ignore[attr-defined]
    # Targets up to the new maximum are accepted and forwarded.
    c.request("POST", "/api/vms/dmvm/memory", {"target": "2560M"})
    assert dm.target == 2560 << 20  # type: ignore[attr-defined]
    # A worker that refuses leaves the stored settings as they were.
    dm.refuse_limits = "maximum can only go up"  # type: ignore[attr-defined]
    with pytest.raises(ClientError, match="did not take the new Dynamic Memory range") as e:
        c.request("PATCH", "/api/vms/dmvm", {"maximum": "4G"})
    assert e.value.status == 409
    settings = c.request("GET", "/api/vms/dmvm")["settings"]
    assert (settings["minimum"], settings["maximum"]) == (128 << 20, 3 * GIB)


def test_memory_of_a_worker_without_the_dm_channel_is_409_not_running(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    c = _client(vmms[1])
    c.request("POST", "/api/vms", {"name": "x", "memory": "512M", "dynamic_memory": True})
    c.request("POST", "/api/vms/x/start")
    with pytest.raises(ClientError, match="Dynamic Memory is not running in this VM") as e:
        c.request("POST", "/api/vms/x/memory", {"target": "768M"})
    assert e.value.status == 409


def test_the_console_streams_the_serial_port_both_ways(vmms: tuple[Vmms, ApiServers]) -> None:
    c = _client(vmms[1])
    with pytest.raises(ClientError, match="VM 'a' is off: start it") as e:
        c.request("POST", "/api/vms", {"name": "a"})
        c.console("a")
    assert e.value.status == 409
    c.request("POST", "/api/vms/a/start")
    sock = c.console("a")
    with sock:
        sock.settimeout(10)
        got = b""
        while b"pyhv> " not in got:
            got += sock.recv(100)  # the recent output comes first
        sock.sendall(b"mem\r")
        while b"mem\r\n" not in got:
            got += sock.recv(100)
        c.request("POST", "/api/vms/a/stop")
        while sock.recv(100):
            pass  # the stream ends with the VM
    status, _, body = raw(vmms[1], request("POST", "/api/vms/a/console"))
    assert status == 409 and "start it to use its console" in body["error"]


def test_what_a_console_client_types_just_before_it_leaves_is_typed(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    c = _client(vmms[1])
    c.request("POST", "/api/vms", {"name": "a"})
    c.request("POST", "/api/vms/a/start")
    with c.console("a") as sock:
        sock.sendall(b"parting words\r")  # and leave at once
    entry = vmms[0].entry("a")
    assert entry is not None
    wait_for(lambda: entry.consoles == [], 10, "the console detached")
    with c.console("a") as sock:  # the echo is in the recent output
        sock.settimeout(10)
        got = b""
        while b"parting words\r\n" not in got:
            got += sock.recv(4096)


def test_metrics_are_prometheus_text_and_openapi_documents_the_api(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    service, servers = vmms
    service.balancer.tick()
    c = _client(servers)
    text = c.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    available = families["pyhv_dynamic_memory_balancer_available_memory_bytes"]
    assert available.samples[0].value == service.pool.free_pages * 4096
    assert "pyhv_virtual_machine_health_summary_health_ok" in " ".join(families)
    doc = c.request("GET", "/openapi.json")
    assert doc["openapi"].startswith("3.")
    assert {"/api/vms", "/api/vms/{name}", "/api/vms/{name}/memory", "/metrics"} <= set(
        doc["paths"]
    )
    page = c.request("GET", "/perfmon")
    assert "<svg" in page and "/api/counters" in page


def _pyhv(*args: str) -> tuple[int, str]:
    """`pyhv ARGS` in this process: its exit status and all it printed, never a traceback."""
    from pyhv.cli import run_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = run_cli(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    assert "Traceback" not in out.getvalue()
    return code, out.getvalue()


def test_pyhv_counters_once_prints_each_counter_by_its_perfmon_path(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    service, servers = vmms
    service.balancer.tick()
    code, output = _pyhv(
        "counters", "--socket", str(servers.unix.path), "--once", "-c", "Available"
    )
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split() == ["Counter", "Value"]
    assert lines[1].startswith(r"\Hyper-V Dynamic Memory Balancer\Available Memory ")
    assert float(lines[1].split()[-1]) == service.pool.free_pages / 256
    assert len(lines) == 3  # only the paths with "Available"


def test_the_vm_commands_reach_the_vmms_over_tcp_with_the_token_file(
    vmms: tuple[Vmms, ApiServers], tmp_path: Path
) -> None:
    service, servers = vmms
    assert servers.tcp_address is not None
    tcp = f"127.0.0.1:{servers.tcp_address[1]}"
    state = str(service.store.state_dir)
    code, output = _pyhv("vm", "--state-dir", state, "--tcp", tcp, "create", "t")
    assert code == 0 and "t: off" in output
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token-of-this-vmms\n")
    code, output = _pyhv("vm", "--tcp", tcp, "--token-file", str(wrong), "list")
    assert code == 1 and "Error: a wrong bearer token" in output
    code, output = _pyhv("vm", "--tcp", tcp, "--token", "nope", "list")  # `ps` would show it
    assert code == 2 and "--token would show the secret" in output
    assert "--token-file FILE or $PYHV_VMMS_TOKEN" in output
    code, output = _pyhv("vm", "list", "--state-dir", state, "--tcp", tcp)  # options after, too
    assert code == 0 and output.split()[:2] == ["NAME", "STATE"] and "\nt " in output
    code, output = _pyhv("vm", "--tcp", "localhost", "list")
    assert code == 2 and "is not HOST:PORT" in output


@pytest.mark.simulation
@pytest.mark.parametrize(
    "command", [["show"], ["start"], ["memory"], ["memory", "--target", "768M"], ["delete"]]
)
def test_a_vm_command_on_an_unknown_vm_says_which_and_where_to_look(
    vmms: tuple[Vmms, ApiServers], command: list[str]
) -> None:
    _, servers = vmms
    code, output = _pyhv(
        "vm", "--socket", str(servers.unix.path), command[0], "ghost", *command[1:]
    )
    assert code == 1
    assert output.startswith("Error: no VM named 'ghost': `pyhv vm list` shows the VMs"), output


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--memory-budget", "lots"], "memory size 'lots' is not understood"),
        (["--time-scale", "0"], "time_scale must be > 0"),
        (["--tcp", "0.0.0.0:8650"], "is not a loopback address: beyond loopback the VMMS"),
        (["--tcp", "8650"], "is not HOST:PORT"),
        (["--tcp", "127.0.0.1:0", "--token", "t"], "--token would show the secret"),
        (["--tls-cert", "c.pem"], "TLS needs both --tls-cert and --tls-key"),
    ],
)
def test_vmms_serve_refuses_bad_options_with_a_clear_message(
    tmp_path: Path, args: list[str], words: str
) -> None:
    code, output = _pyhv("vmms", "serve", "--state-dir", str(tmp_path), *args)
    assert code in (1, 2) and words in output, output


@pytest.mark.unit
def test_the_served_and_the_committed_openapi_are_the_one_the_declarations_give(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    import msgspec

    from pyhv.vmms import bodies
    from pyhv.vmms.openapi import openapi

    generated = openapi()
    _, declared = msgspec.json.schema_components(
        bodies.SCHEMAS, ref_template="#/components/schemas/{name}"
    )
    assert generated["components"]["schemas"] == declared
    assert _client(vmms[1]).request("GET", "/openapi.json") == generated
    path = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"
    assert json.loads(path.read_text()) == generated, (
        "docs/openapi.json is stale: regenerate it with "
        "python -m pyhv.vmms.openapi > docs/openapi.json"
    )


@pytest.mark.unit
def test_the_vmms_answers_are_the_bodies_its_openapi_declares(
    vmms: tuple[Vmms, ApiServers],
) -> None:
    import msgspec

    from pyhv.vmms import bodies

    c = _client(vmms[1])

    def check(kind: type, value: Any) -> None:
        msgspec.convert(value, kind, strict=True)  # raises naming the field that differs

    check(bodies.Vm, c.request("POST", "/api/vms", {"name": "dm1", "dynamic_memory": True}))
    check(bodies.Vm, c.request("POST", "/api/vms/dm1/start"))
    check(bodies.Vm, c.request("PATCH", "/api/vms/dm1", {"weight": 70}))
    check(bodies.VmList, c.request("GET", "/api/vms"))
    check(bodies.MemoryStatus, c.request("GET", "/api/vms/dm1/memory"))
    answer = c.request("POST", "/api/vms/dm1/memory", {"target": "768M"})
    check(bodies.MemoryTargetAccepted, answer)
    check(bodies.HostPool, c.request("GET", "/api/host"))
    check(bodies.CounterSnapshot, c.request("GET", "/api/counters"))
    check(bodies.MigrationList, c.request("GET", "/api/migrations"))
    with pytest.raises(ClientError) as e:
        c.request("GET", "/api/vms/ghost")
    check(bodies.Error, {"error": str(e.value), "status": e.value.status})


_JSON = json_values()
_SETTING = st.sampled_from(["name", "vps", "memory", "minimum", "weight", "buffer", "image", "x"])


@pytest.mark.unit
@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.sampled_from(
        [
            "/api/vms",
            "/api/vms/a",
            "/api/vms/a/memory",
            "/api/vms/a/migrate",
            "/api/migrations/incoming",
            "/api/migrations/m1/resolve",
            "/api/vms/a/start",
        ]
    ),
    body=_JSON | st.dictionaries(_SETTING, _JSON, max_size=4),
)
def test_any_json_body_is_taken_or_refused_with_a_4xx_and_the_vmms_serves_on(
    vmms: tuple[Vmms, ApiServers], path: str, body: object
) -> None:
    method = "PATCH" if path == "/api/vms/a" else "POST"
    got, _, answer = raw(vmms[1], request(method, path, json.dumps(body).encode()))
    assert got in (200, 201, 202, 400, 404, 409), answer  # never a 500
    if got >= 400:
        assert answer["status"] == got and answer["error"]
    assert _client(vmms[1]).request("GET", "/api/host")["budget"] > 0


def test_the_console_streams_over_mutual_tls(tmp_path: Path) -> None:
    from pyhv.vmms.client import ClientTls
    from pyhv.vmms.server import ServerTls
    from tests.support.certs import make_ca

    ca = make_ca(tmp_path / "ca")
    cert, key = ca.issue("vmms")
    service = Vmms(
        tmp_path / "state",
        budget_bytes=4 * GIB,
        reserve_bytes=GIB // 2,
        worker_factory=FakeWorker,
        image_resolver=lambda: __file__,
    )
    servers = ApiServers(
        service,
        tmp_path / "state" / "vmms.sock",
        ("127.0.0.1", 0),
        tls=ServerTls(cert, key, ca.cert),
    )
    servers.start()
    try:
        assert servers.tcp_url is not None and servers.tcp_url.startswith("https://")
        c = VmmsClient(
            tcp=servers.tcp_url.removeprefix("https://"),
            token=(tmp_path / "state" / "token").read_text().strip(),
            tls=ClientTls(ca.cert, *ca.issue("admin")),
            timeout=10,
        )
        c.request("POST", "/api/vms", {"name": "a"})
        c.request("POST", "/api/vms/a/start")
        with c.console("a") as sock:
            sock.settimeout(10)
            got = b""
            while b"pyhv> " not in got:
                got += sock.recv(100)
            sock.sendall(b"mem\r")
            while b"mem\r\n" not in got:
                got += sock.recv(100)
    finally:
        servers.close()
        service.close()
