"""End to end, as a reader of the book watches Dynamic Memory work: a real reference guest under
a real VMMS, `pyhv vm trace NAME --only dm --json` attached as a user runs it, `testlimit` in the
guest; the trace shows the guest's status reports, then the VSP's hot-add request and the
guest's response, decoded field by field, in order, with what the guest sent and what the
worker mapped."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.floor import floor_pages  # guest/pmm.c's balloon floor is Linux's
from tests.support.wait import wait_for
from tests.vmms.vmms_process import ROOT, VmmsProcess

pytestmark = pytest.mark.guest

MIB_PAGES = 256
STARTUP = 256 << 20
ALIGN_PAGES = 2 * MIB_PAGES  # the guest's hot-add alignment (2^1 MiB, its capabilities report)


class Trace:
    """`pyhv vm trace` as a subprocess; its JSON lines as they come."""

    def __init__(self, host: VmmsProcess, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pyhv.cli",
                "vm",
                "--state-dir",
                str(host.state),
                "trace",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.events: list[dict[str, Any]] = []
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._q.put(json.loads(line))
        self._q.put(None)

    def until(
        self, done: Callable[[list[dict[str, Any]]], bool], timeout: float, what: str
    ) -> None:
        """Read events until `done(events)` holds; fail after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done(self.events):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout} s; last: {self.events[-5:]}")
            try:
                e = self._q.get(timeout=left)
            except queue.Empty:
                continue
            if e is None:
                assert self.proc.stderr is not None
                raise AssertionError(f"pyhv vm trace ended: {self.proc.stderr.read()}")
            self.events.append(e)

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        assert self.proc.stderr is not None
        return self.proc.returncode, self.proc.stderr.read()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[VmmsProcess]:
    h = VmmsProcess(tmp_path, "host", "3G")
    try:
        yield h
    finally:
        h.close()


def _dm(events: list[dict[str, Any]], message: str) -> list[dict[str, Any]]:
    return [e for e in events if e["kind"] == "dm" and e["message"] == message]


def _record_to_file(host: VmmsProcess, path: Path) -> list[dict[str, Any]]:
    """`pyhv vm trace dm --only dm --out FILE --count 2`, then `pyhv trace show FILE --json`."""
    pyhv = [sys.executable, "-m", "pyhv.cli"]
    r = subprocess.run(
        [*pyhv, "vm", "--state-dir", str(host.state), "trace", "dm", "--only", "dm"]
        + ["--out", str(path), "--count", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "2 events recorded" in r.stderr, r.stderr
    r = subprocess.run(
        [*pyhv, "trace", "show", str(path), "--json"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_vm_trace_shows_status_reports_then_the_hot_add_and_its_response_decoded_in_order(
    host: VmmsProcess, tmp_path: Path
) -> None:
    host.vm("create", "dm", "--memory", "256M", "--dynamic", "--minimum", "128M", "--maximum", "2G")
    assert "start it to trace it" in host.vm("trace", "dm", check=False)
    assert "no VM named 'nosuch'" in host.vm("trace", "nosuch", check=False)
    assert "unknown kind teleport" in host.vm("trace", "dm", "--only", "teleport", check=False)
    host.vm("start", "dm")
    trace = Trace(host, "dm", "--only", "dm", "--json")
    decisions = Trace(host, "dm", "--only", "balancer", "--json")  # a second watcher
    try:
        trace.until(lambda ev: len(_dm(ev, "STATUS_REPORT")) >= 2, 120, "status reports")
        before = _dm(trace.events, "STATUS_REPORT")[-1]["fields"]["num_committed"]
        recorded = _record_to_file(host, tmp_path / "dm.trace")
        out = host.shell("dm", "testlimit -m 400 -c 1", b"committed 400 MiB")
        assert "committed 400 MiB" in out

        def added(ev: list[dict[str, Any]]) -> bool:
            responses = _dm(ev, "MEM_HOT_ADD_RESPONSE")
            return bool(responses) and len(responses) == len(_dm(ev, "MEM_HOT_ADD_REQUEST"))

        trace.until(added, 120, "hot-add request answered")

        # wait until the balancer has added the buffer on top (no operation in flight)
        def buffered() -> dict[str, Any] | None:
            status: dict[str, Any] = host.client.request("GET", "/api/vms/dm/memory")
            committed = status["committed"] or 0
            done = committed >= 400 << 20 and status["visible"] >= committed * 1.2 - (1 << 20)
            return status if done else None

        status = wait_for(buffered, 120, "the buffer added on top of 400 MiB", interval=0.2)
        trace.until(added, 60, "every hot-add request answered")
        mem = host.shell("dm", "mem", b"hot-added:")
        seen = {k: int(v) for k, v in re.findall(r"(\w[\w-]*): (\d+) MiB", mem)}
        t_mem = time.time()  # events carry the worker's wall clock: the same host's clock
        trace.until(
            lambda ev: any(e["t"] > t_mem for e in _dm(ev, "STATUS_REPORT")), 30, "a later report"
        )
        decisions.until(
            lambda ev: any(e["action"] == "add" for e in ev), 30, "the balancer's add decision"
        )

        # Quiet before the trace stops: every request answered, a report after the last
        # response, and the balancer's decision after that report is to do nothing (the demand
        # did not move: the guest's floor is of its boot RAM, not of the memory added).
        def settled(ev: list[dict[str, Any]]) -> bool:
            if not added(ev):
                return False
            last = _dm(ev, "MEM_HOT_ADD_RESPONSE")[-1]["t"]
            return any(e["t"] > last for e in _dm(ev, "STATUS_REPORT"))

        trace.until(settled, 60, "every request answered, then a report")
        reported = _dm(trace.events, "STATUS_REPORT")[-1]["t"]
        decisions.until(
            lambda ev: any(e["t"] > reported and e["action"] == "none" for e in ev),
            30,
            "the balancer deciding nothing after the last report",
        )
        status = host.client.request("GET", "/api/vms/dm/memory")
    finally:
        code, err = trace.stop()
        decisions.stop()
    assert code == 0 and "Traceback" not in err, err
    # recorded to a file and read back: two DM messages, decoded as they were streamed
    assert [e["kind"] for e in recorded] == ["dm", "dm"]
    assert all(e["fields"] and e["direction"] in ("guest->host", "host->guest") for e in recorded)
    # The balancer (in the VMMS) decided the add from the pressure the reports gave it.
    add = next(e for e in decisions.events if e["action"] == "add")
    assert {e["kind"] for e in decisions.events} <= {"balancer", "dropped"}
    assert add["pressure"] > 100 and add["pages"] > 0 and add["target"] > add["assigned"]
    assert {e["kind"] for e in trace.events} <= {"dm", "dropped"}  # --only dm

    # In order: reports, then each request answered (same transaction) before the next one.
    dm = [e for e in trace.events if e["kind"] == "dm"]
    first_add = next(i for i, e in enumerate(dm) if e["message"] == "MEM_HOT_ADD_REQUEST")
    assert any(e["message"] == "STATUS_REPORT" for e in dm[:first_add])
    pairs = [e for e in dm if e["message"].startswith("MEM_HOT_ADD")]
    requests, responses = pairs[0::2], pairs[1::2]
    assert [e["message"] for e in requests] == ["MEM_HOT_ADD_REQUEST"] * len(requests)
    assert [e["message"] for e in responses] == ["MEM_HOT_ADD_RESPONSE"] * len(requests)
    assert all(e["direction"] == "host->guest" for e in requests)
    assert all(e["direction"] == "guest->host" for e in responses)
    for rq, rs in zip(requests, responses, strict=True):
        # (each side numbers its own transactions, as Linux's hv_balloon: ids do not pair)
        assert rs["t"] >= rq["t"]
        # the guest took every page it was offered, and said so
        assert rs["fields"]["page_count"] == rq["fields"]["range_page_cnt"] > 0
        assert rs["fields"]["result"] == 1

    # One add answered the burst: the demand did not move after it (the guest's floor is of its
    # boot RAM), so the balancer did not chase it with smaller and smaller adds (it did, 4 of
    # them, when the floor grew with every add: docs/balancer.md, "The guest's floor").
    assert 1 <= len(requests) <= 2, [rq["fields"] for rq in requests]
    # The ranges are where the worker mapped them: right above the startup RAM, each at the
    # previous one's end rounded up to the guest's hot-add alignment, together the memory the
    # VMMS sees added.
    start = STARTUP // 4096
    for rq in requests:
        assert rq["fields"]["range_start_page"] == start
        start = -(-(start + rq["fields"]["range_page_cnt"]) // ALIGN_PAGES) * ALIGN_PAGES
    added_pages = sum(rq["fields"]["range_page_cnt"] for rq in requests)
    assert status["visible"] == STARTUP + added_pages * 4096
    assert seen["hot-added"] == added_pages // MIB_PAGES
    assert seen["visible"] == (STARTUP >> 20) + seen["hot-added"]

    # The status report after `mem` carries what the guest's `mem` printed: its committed
    # pages (plus the balloon floor, as Linux's hv_balloon), its free pages as available.
    report = next(e for e in _dm(trace.events, "STATUS_REPORT") if e["t"] > t_mem)["fields"]
    assert set(report) == {
        "num_avail",
        "num_committed",
        "page_file_size",
        "zero_free",
        "page_file_writes",
        "io_diff",
    }
    visible = seen["visible"] * MIB_PAGES
    ram = visible - seen["ballooned"] * MIB_PAGES
    floor = floor_pages(ram, STARTUP // 4096)
    expected = (seen["committed"] + seen["ballooned"]) * MIB_PAGES + floor
    assert abs(report["num_committed"] - expected) <= 2 * MIB_PAGES  # `mem` rounds to MiB
    assert abs(report["num_avail"] - seen["free"] * MIB_PAGES) <= 2 * MIB_PAGES
    assert report["num_committed"] > before + 400 * MIB_PAGES - MIB_PAGES
