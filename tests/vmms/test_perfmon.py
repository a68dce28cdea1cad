"""The VMMS's live chart page in headless Chromium: opened over TCP by the one-time URL `pyhv
vmms chart` prints (its code is spent for a short-lived cookie), it polls /api/counters and
draws each counter as a Perfmon line, scaled by a power of ten. A token in the URL, or a code
used twice, is refused."""

from __future__ import annotations

import contextlib
import html
import io
import re
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyhv.vmms.server import ApiServers
from pyhv.vmms.service import Vmms
from tests.vmms.fakes import FakeDmWorker

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = pytest.mark.simulation


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Vmms, ApiServers]]:
    service = Vmms(
        tmp_path / "state",
        budget_bytes=4 << 30,
        worker_factory=FakeDmWorker,
        image_resolver=lambda: __file__,
    )
    servers = ApiServers(service, tmp_path / "state" / "vmms.sock", ("127.0.0.1", 0))
    servers.start()
    service.create({"name": "testvm", "memory": "512M", "dynamic_memory": True})
    service.start("testvm")
    service.balancer.tick()  # the counters of the book's two sets now have values
    try:
        yield service, servers
    finally:
        servers.close()
        service.close()


def _dump_dom(url: str, profile: Path) -> str:
    assert CHROMIUM.exists(), (
        f"{CHROMIUM} is missing: apt-get install -y chromium (the chart page is tested in it)"
    )
    r = subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def _chart_url(servers: ApiServers) -> str:
    """What `pyhv vmms chart` prints (asked over the Unix socket)."""
    code, output = _pyhv("vmms", "chart", "--socket", str(servers.unix.path))
    assert code == 0, output
    url = output.strip()
    assert servers.tcp_url is not None and url.startswith(f"{servers.tcp_url}/perfmon?code=")
    return url


def _pyhv(*args: str) -> tuple[int, str]:
    from pyhv.cli import run_cli

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = run_cli(list(args))
    return code, out.getvalue()


def test_the_chart_page_draws_a_line_per_counter_from_the_api(
    served: tuple[Vmms, ApiServers], tmp_path: Path
) -> None:
    service, servers = served
    dom = _dump_dom(_chart_url(servers), tmp_path / "profile")
    lines = {
        html.unescape(counter): d
        for counter, d in re.findall(
            r'<path class="series[^"]*"[^>]*data-counter="([^"]*)" d="([^"]*)"', dom
        )
    }
    assert set(lines) == set(service.counters()), "one line per counter"
    physical = lines[r"\Hyper-V Dynamic Memory VM(testvm)\Physical Memory"]
    points = re.findall(r"[ML]([\d.]+),([\d.]+)", physical)
    assert len(points) >= 2, f"a line needs samples: {physical!r}"
    # 512 MB at Perfmon's scale 0.1 is 51.2 of the chart's 100: y = 10 + 400 - 51.2 x 4.
    assert {float(y) for _, y in points} == {205.2}
    assert "Physical Memory" in dom and "testvm" in dom  # the legend names counter and instance


def test_over_tcp_a_token_in_the_url_or_a_chart_code_used_twice_is_refused(
    served: tuple[Vmms, ApiServers], tmp_path: Path
) -> None:
    service, servers = served
    token = (service.store.state_dir / "token").read_text().strip()
    dom = _dump_dom(f"{servers.tcp_url}/perfmon?token={token}", tmp_path / "p1")
    assert "a token in the URL (?token=) is refused" in dom and '"status": 401' in dom
    assert "data-counter" not in dom
    url = _chart_url(servers)
    assert "data-counter" in _dump_dom(url, tmp_path / "p2")
    dom = _dump_dom(url, tmp_path / "p3")  # a fresh browser with the same URL
    assert "this chart code is spent" in dom and '"status": 401' in dom
    assert "data-counter" not in dom
    # Without the cookie or a token, neither the page nor the counters are served.
    status, _, body = raw_get(servers, "/api/counters")
    assert status == 401 and "no bearer token" in body


def raw_get(servers: ApiServers, path: str, extra: str = "") -> tuple[int, str, str]:
    """GET `path` over TCP as written; status, headers and body as text."""
    assert servers.tcp_address is not None
    with socket.create_connection(servers.tcp_address, timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{extra}\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), head, body


def test_a_chart_code_buys_a_short_lived_httponly_strict_cookie_that_only_reads_counters(
    served: tuple[Vmms, ApiServers],
) -> None:
    _, servers = served
    path = _chart_url(servers).split("/", 3)[3]
    status, head, _ = raw_get(servers, f"/{path}")
    assert status == 303 and "location: /perfmon" in head.lower()
    cookie = next(line for line in head.split("\r\n") if line.lower().startswith("set-cookie:"))
    for attribute in ("HttpOnly", "SameSite=Strict", "Max-Age=3600", "Path=/"):
        assert attribute in cookie, cookie
    pair = cookie.split(":", 1)[1].split(";")[0].strip()
    status, _, body = raw_get(servers, "/api/counters", f"Cookie: {pair}\r\n")
    assert status == 200 and "Hyper-V Dynamic Memory" in body
    status, _, body = raw_get(servers, "/api/vms", f"Cookie: {pair}\r\n")
    assert status == 403 and "only reads the counters" in body
    status, _, body = raw_get(servers, f"/{path}")  # the code again
    assert status == 401 and "spent" in body
