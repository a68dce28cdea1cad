"""The VMMS's live chart page in headless Chromium: it polls /api/counters (over TCP, with the
token from its URL) and draws each counter as a Perfmon line, scaled by a power of ten."""

from __future__ import annotations

import html
import re
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
def served(tmp_path: Path) -> Iterator[tuple[Vmms, str]]:
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
    token = (tmp_path / "state" / "token").read_text().strip()
    assert servers.tcp_address is not None
    host, port = servers.tcp_address
    try:
        yield service, f"http://{host}:{port}/perfmon?token={token}"
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


def test_the_chart_page_draws_a_line_per_counter_from_the_api(
    served: tuple[Vmms, str], tmp_path: Path
) -> None:
    service, url = served
    dom = _dump_dom(url, tmp_path / "profile")
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


def test_over_tcp_the_chart_page_needs_the_token(served: tuple[Vmms, str], tmp_path: Path) -> None:
    _, url = served
    dom = _dump_dom(url.split("?")[0] + "?token=wrong", tmp_path / "profile")
    assert "a wrong bearer token" in dom and '"status": 401' in dom
    assert "data-counter" not in dom
