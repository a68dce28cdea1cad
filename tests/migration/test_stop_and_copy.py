"""The stop-and-copy phase (docs/migration.md): what is typed at the source while the VM is
paused there reaches the guest at the destination (the serial input held from the state's save
and sent with COMMIT: before the destination's VPs run with two-phase commit, right after
otherwise)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved
from tests.support.sched import realtime_threads
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest


@pytest.mark.parametrize("two_phase", [False, True], ids=["state-commits", "two-phase"])
def test_keys_typed_at_the_source_during_the_pause_reach_the_guest_at_the_destination(
    hosts: Any, two_phase: bool
) -> None:
    src, guest = hosts.boot()
    before = guest.ticks()
    dst = hosts.destination()
    paused = threading.Event()
    box: dict[str, Any] = {}

    def on_progress(p: dict[str, Any]) -> None:
        if p["phase"] == "commit":  # the source's VPs are paused, its state already sent
            paused.set()

    def run() -> None:
        opts = {"faults": {"commit": "hold"}, "two_phase_commit": two_phase}
        box["result"] = migrate_worker(src, dst.wait_listening(), TOKEN, opts, on_progress)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert paused.wait(60), "the migration never reached its pause"
    src.send(b"ticks\r")  # typed at the source while the VM is paused there
    t.join(60)
    assert "result" in box, "the migration did not finish"
    assert dst.wait_migrated(30) is not None
    # the guest's shell at the destination echoes the command and runs it
    out = dst.serial.read_until(b"pyhv> ", 30).decode()
    assert "ticks" in out.split("\n", 1)[0] and "ticks: " in out, out
    ticks = int(out.split("ticks: ", 1)[1].split()[0])
    assert ticks >= before
    assert moved(dst).ticks() >= ticks
    end = src.wait(30)
    assert end is not None and "migrated to" in end.detail


def test_the_destination_runs_the_vm_before_the_source_tears_its_copy_down(hosts: Any) -> None:
    src, _guest = hosts.boot()
    dst = hosts.destination()
    result = migrate_worker(src, dst.wait_listening(), TOKEN, {})
    end = src.wait(30)
    torn_down = time.monotonic()  # the source worker's VM ended: its teardown is over
    assert end is not None and "migrated to" in end.detail
    # one host, one CLOCK_MONOTONIC: the destination's VPs ran before the teardown ended
    assert 0 < result["destination_running_since"] < torn_down
    parts = result["downtime_parts"]
    # one hop: the STATE frame committed (no RESTORED/COMMIT round trip inside the pause),
    # and each side measured its steps
    assert "restored" not in parts
    assert {"pause", "last_pages", "state_save", "state", "resumed"} <= set(parts)
    assert {"destination_state_in", "destination_restore"} <= set(parts)
    # the state went ahead of the last pages (the source's steps in the order it took them)
    # and the destination restored it before they were all in (`pages_in`: from the
    # restore's end to the last pages in)
    steps = [n for n in parts if n in ("state_save", "state", "last_pages")]
    assert steps == ["state_save", "state", "last_pages"], parts
    assert "destination_pages_in" in parts, parts
    # the window QEMU's STOP/RESUME events span: from every VP parked, the pause left out
    events = result["downtime_events"]
    assert 0 < events < result["downtime"]
    assert abs((result["downtime"] - events) * 1000 - parts["pause"]) <= 0.006, (events, parts)
    assert moved(dst).ticks() > 0


def test_the_threads_of_the_pause_run_real_time_for_the_pause_only(hosts: Any) -> None:
    """The source's migration thread and the VP thread it parks, the destination's receiver
    and the VP thread it wakes: SCHED_FIFO during the pause (root here), none of them after."""
    assert os.geteuid() == 0, "this test checks SCHED_FIFO threads: run it as root"
    src, _guest = hosts.boot()
    dst = hosts.destination()
    result = migrate_worker(src, dst.wait_listening(), TOKEN, {})
    assert dst.wait_migrated(30) is not None
    # one VP on each side, plus the migration thread and the receiver
    assert result["realtime"] == {
        "granted": 2,
        "refused": 0,
        "destination_granted": 2,
        "destination_refused": 0,
    }
    assert dst.pid is not None and realtime_threads(dst.pid) == []
    assert moved(dst).ticks() > 0  # its VP runs guest code, at the ordinary priority


def test_the_owner_confirms_the_arrival_before_the_source_pauses(hosts: Any) -> None:
    """A destination that waits for its owner's word (`confirm`, as the VMMS starts it) asks at
    PREPARE: the owner answers while the source VM still runs (its shell answers), so the
    commit inside the pause has no round trip to the owner left; the VM then runs there."""
    src, guest = hosts.boot()
    dst = hosts.destination(confirm=True)
    phases: list[str] = []
    asked: list[int] = []

    def committed(config: dict[str, Any]) -> bool:
        # (the source's progress comes on another socket: wait for it, bounded)
        wait_for(lambda: "prepare" in phases, 10, "the source reporting its prepare phase")
        assert "done" not in phases
        asked.append(guest.ticks())  # the source VM answers: it runs, not paused
        return True

    dst.on_committed = committed
    result = migrate_worker(
        src, dst.wait_listening(), TOKEN, {}, lambda p: phases.append(p["phase"])
    )
    assert dst.wait_migrated(30) is not None
    assert len(asked) == 1  # asked once, and answered by a running source
    assert "destination_gate" in result["downtime_parts"]  # the look at the commit, measured
    assert moved(dst).ticks() >= asked[0]
