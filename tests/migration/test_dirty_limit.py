"""The per-VP dirty limit (QEMU 8.1's dirty-limit) through KVM's dirty ring: during a migration
a VP that writes faster than the limit sleeps in its own thread, while a VP that only reads runs
on at its own speed; the migration completes on byte-identical memory."""

from __future__ import annotations

import re
import threading
from typing import Any

import pytest

from pyhv.guest_image import image_path
from pyhv.migration import MigrationError
from pyhv.migration.dirtylimit import INTERVAL, rate_bound
from pyhv.migration.worker import migrate_worker
from pyhv.trace.events import DirtyRateEvent
from pyhv.worker import VmConfig
from pyhv.worker.process import WorkerProcess
from tests.migration.conftest import TOKEN, Guest, moved, wait_rising
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

RING = 16384  # entries per VP (smaller rings overflow here: docs/migration.md)
LIMIT = 2000  # pages/s per VP (8 MB/s)


def _reads(guest: Guest) -> tuple[int, int]:
    """(pages the read task read, the guest tick it said so at), from the guest itself."""
    m = re.search(r"task \d+: read (\d+) pages by tick (\d+)", guest.run("tasks"))
    assert m, "no read task"
    return int(m[1]), int(m[2])


def _reads_per_tick(guest: Guest, ticks: int = 100) -> float:
    """VP 0's reads per guest tick over `ticks` of the guest's own clock."""
    pages0, tick0 = _reads(guest)
    wait_for(lambda: guest.ticks() >= tick0 + ticks, 60, f"{ticks} guest ticks")
    pages1, tick1 = _reads(guest)
    return (pages1 - pages0) / max(tick1 - tick0, 1)


def test_a_writer_vp_is_held_to_the_limit_while_a_reader_vp_keeps_its_speed(hosts: Any) -> None:
    src = WorkerProcess(
        VmConfig.create(image=image_path(), memory="256M", vps=2, dirty_ring_entries=RING)
    )
    hosts_workers = [src]
    try:
        src.start()
        guest = Guest(src)
        assert "read: task" in guest.run("read 16 -c 0")
        assert "on cpu 1" in guest.run("dirty 64 -c 1")
        guest.wait_working_set(64, task=1)
        before = _reads_per_tick(guest)  # VP 1 writes as fast as it can meanwhile

        dst = hosts.destination()
        progress: list[dict[str, Any]] = []
        box: dict[str, Any] = {}

        def migrate() -> None:
            try:
                box["result"] = migrate_worker(
                    src,
                    dst.wait_listening(),
                    TOKEN,
                    # a slow link: pass 1 (some 80 MiB) takes seconds, the limit in force
                    {"dirty_limit": LIMIT, "bandwidth": 24 << 20, "downtime_target": 0.05},
                    on_progress=progress.append,
                )
            except BaseException as e:  # noqa: BLE001 - reported by the test
                box["error"] = e

        t = threading.Thread(target=migrate)
        t.start()
        wait_for(lambda: any(p["dirty_limit_seconds"] > 0 for p in progress), 60, "limit on")
        during = _reads_per_tick(guest)
        still = progress[-1]["phase"]
        t.join(120)
        assert not t.is_alive(), "the migration did not end"
        assert "error" not in box, box.get("error")
        result = box["result"]
        assert still.startswith("pass"), f"the reads were counted after the passes ({still})"

        # the migration completed on identical memory (verify: the destination compared the
        # source's checksum at pause with its own before it resumed) and the guest goes on
        arrived = dst.wait_migrated(30)
        assert arrived is not None and result["phase"] == "done"
        # the ring is a creation-time property: the destination created its VM with it too
        assert arrived["config"]["dirty_ring_entries"] == RING
        there = moved(dst)
        first, later = wait_rising(lambda: there.touched(1))
        assert later > first

        # VP 1 was held to the limit: every rate reported over a full window, and on average
        assert result["dirty_limit"] == LIMIT
        full = [p for p in progress if p["dirty_limit_seconds"] >= 1.0]
        assert full, "the limit was in force less than a second"
        most = result["vp_burst_max"][1]  # VP 1's pages between two sleeps, at most
        bound = rate_bound(LIMIT, most)
        worst = max(p["vp_dirty_rates"][1] for p in full)
        assert worst <= bound, f"VP 1 dirtied {worst:.0f} pages/s, above {bound:.0f}"
        seconds = result["dirty_limit_seconds"]
        assert result["vp_dirty_pages"][1] <= LIMIT * (seconds + INTERVAL) + most
        assert result["vp_throttled_ms"][1] > 0  # it slept for the limit
        # VP 0 only reads: it was never asked to sleep, and read as fast as before
        assert result["vp_throttled_ms"][0] == 0
        print(f"VP 0 reads/tick: {before:.0f} before, {during:.0f} with VP 1 limited; VP 1 at "
              f"most {worst:.0f} pages/s (bound {bound:.0f}), slept {result['vp_throttled_ms'][1]:.0f} ms, "
              f"ring overflows {result['dirty_ring_overflows']}")  # fmt: skip
        assert during >= 0.7 * before, f"VP 0 read {during:.0f}/tick, {before:.0f} before"
    finally:
        for w in hosts_workers:
            w.close()


def test_a_dirty_limit_on_a_vm_without_the_ring_is_refused_and_the_vm_runs_on(
    hosts: Any,
) -> None:
    src, guest = hosts.boot("128M")
    dst = hosts.destination()
    with pytest.raises(MigrationError, match="dirty ring") as err:
        migrate_worker(src, dst.wait_listening(), TOKEN, {"dirty_limit": 2000})
    assert "dirty_ring_entries" in str(err.value)
    assert src.end is None
    wait_rising(guest.ticks)


def test_an_automatic_limit_comes_from_the_bandwidth_when_the_passes_stop_shrinking(
    hosts: Any,
) -> None:
    src = WorkerProcess(VmConfig.create(image=image_path(), memory="128M", dirty_ring_entries=RING))
    try:
        src.start()
        guest = Guest(src)
        guest.run("dirty 32")
        guest.wait_working_set(32)
        events: list[Any] = []
        src.trace_listeners.append(events.extend)  # the flight recorder: dirtyrate events
        src.trace(True)
        dst = hosts.destination()
        result = migrate_worker(
            src,
            dst.wait_listening(),
            TOKEN,
            {"dirty_limit": "auto", "bandwidth": 16 << 20, "downtime_target": 0.05},
        )
        assert dst.wait_migrated(30) is not None and result["phase"] == "done"
        # set from the measured bandwidth (a quarter of it, in pages/s: at most 1024 at 16 MiB/s)
        assert 64 <= result["dirty_limit"] <= 1100
        assert result["vp_throttled_ms"][0] > 0
        assert result["throttle_percent"] == 0  # the writer alone was slowed: no auto-converge
        limited = wait_for(
            lambda: [e for e in events if isinstance(e, DirtyRateEvent) and e.limit],
            30,
            "dirtyrate events with the limit",
        )
        assert {e.vp for e in limited} == {0} and limited[-1].limit == result["dirty_limit"]
        assert max(e.throttled_ms for e in limited) > 0
        first, later = wait_rising(moved(dst).touched)
        assert later > first
    finally:
        src.close()
