"""`pyhv migrate`: a demo on loopback with its progress bar, and a destination host taking a VM
that `pyhv migrate run` boots and sends (encrypted)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.guest

PYHV = [sys.executable, "-c", "from pyhv.cli import main; main()"]


@contextmanager
def _listener(token: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A `pyhv migrate listen` destination on loopback and its port; stopped with Ctrl-C."""
    listener = subprocess.Popen(
        [*PYHV, "migrate", "listen", "--listen", "127.0.0.1:0", "--token-file", str(token),
         "--timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert listener.stderr is not None
        line = listener.stderr.readline()
        assert line.startswith("listening on 127.0.0.1:"), line
        yield listener, line.strip().rsplit(":", 1)[1]
    finally:
        listener.send_signal(2)  # Ctrl-C: the destination stops its VM and exits
        try:
            listener.wait(20)
        except subprocess.TimeoutExpired:
            listener.kill()
            listener.wait()


def _migrate_run(
    port: str, token: Path, command: str, *options: str
) -> subprocess.CompletedProcess[str]:
    """`pyhv migrate run` of a 128M VM running `command`, sent encrypted to the local listener."""
    return subprocess.run(
        [*PYHV, "migrate", "run", "--to", f"127.0.0.1:{port}", "--token-file", str(token),
         "-m", "128M", "-c", command, "--encrypt", *options],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip


def _arrival(listener: subprocess.Popen[str]) -> str:
    """The listener's arrival line (a line read is awaited, not polled); "" if it ended first."""
    assert listener.stderr is not None
    while arrived := listener.stderr.readline():
        if "arrived from 127.0.0.1" in arrived:
            break
    return arrived


def test_migrate_demo_moves_a_dirtying_guest_and_shows_it_running_there() -> None:
    out = subprocess.run(
        [*PYHV, "migrate", "demo", "--memory", "128M", "--dirty", "4", "--streams", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "migrated in" in out.stdout and "downtime" in out.stdout
    assert "destination: ticks | ticks:" in out.stdout
    assert "task 0: dirty committed 4 MiB" in out.stdout
    assert " done [########################]" in out.stderr  # the progress line, last state


def test_migrate_listen_takes_the_vm_that_migrate_run_sends(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("a-shared-token-for-this-test\n")
    with _listener(token) as (listener, port):
        sent = _migrate_run(port, token, "dirty 2")
        assert sent.returncode == 0, sent.stderr
        assert "migrated in" in sent.stdout
        arrived = _arrival(listener)
        assert "VM 'vm' arrived from 127.0.0.1" in arrived


def test_migrate_run_postcopy_moves_the_vm_and_reports_its_blocktime(tmp_path: Path) -> None:
    helptext = subprocess.run(
        [*PYHV, "migrate", "run", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "loses the VM" in " ".join(helptext.split())  # post-copy's risk, said up front
    token = tmp_path / "token"
    token.write_text("a-shared-token-for-this-test\n")
    with _listener(token) as (listener, port):
        sent = _migrate_run(port, token, "dirty 4", "--postcopy")
        assert sent.returncode == 0, sent.stderr
        assert "post-copy (post-copy asked for at once)" in sent.stdout
        assert "blocktime p50" in sent.stdout
        arrived = _arrival(listener)
        assert "VM 'vm' arrived from 127.0.0.1" in arrived


def test_migrate_demo_with_a_dirty_limit_holds_the_writer_and_says_so() -> None:
    out = subprocess.run(
        [*PYHV, "migrate", "demo", "--memory", "128M", "--dirty", "16", "--dirty-limit", "2000",
         "--bandwidth", "32M", "--downtime", "50"],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "per VP: vp0 dirtied" in out.stdout and "(limit 2000 pages/s)" in out.stdout
    assert "pages/s (limit 2000)" in out.stderr  # the progress line: each VP's rate


@pytest.mark.unit
def test_a_dirty_limit_below_the_floor_is_refused_before_anything_starts() -> None:
    out = subprocess.run(
        [*PYHV, "migrate", "demo", "--dirty-limit", "10"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "at least 64" in out.stderr and "'auto'" in out.stderr


@pytest.mark.unit
@pytest.mark.parametrize("cmd", ["demo", "run"])
def test_no_postcopy_preempt_without_postcopy_is_refused_with_what_to_add(cmd: str) -> None:
    out = subprocess.run(
        [
            *PYHV,
            "migrate",
            cmd,
            "--no-postcopy-preempt",
            *(["--to", "127.0.0.1:1"] * (cmd == "run")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stderr
    assert "--no-postcopy-preempt without --postcopy" in out.stderr, out.stderr
    assert "add --postcopy or --postcopy-after N" in out.stderr
    assert "Traceback" not in out.stderr


def test_migrate_demo_postcopy_without_preempt_sends_requests_on_the_one_link() -> None:
    out = subprocess.run(
        [*PYHV, "migrate", "demo", "--memory", "128M", "--dirty", "4", "--postcopy",
         "--no-postcopy-preempt"],
        capture_output=True,
        text=True,
        timeout=180,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "post-copy (post-copy asked for at once)" in out.stdout
    assert "requests on the one link (no urgent channel)" in out.stdout
