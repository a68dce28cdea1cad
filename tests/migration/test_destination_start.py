"""The destination sends READY as soon as the VM's partition and RAM exist and takes pass 1
while its VPs and devices are built: the source's pause waits for them (PREPARE), never the
other way round. A build that fails after READY reaches the source as the destination's error."""

from __future__ import annotations

from typing import Any

import pytest

from pyhv.migration import MigrationError
from pyhv.migration.faults import HOLD_SECONDS
from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved, wait_rising

pytestmark = pytest.mark.guest


def test_a_slow_build_at_the_destination_delays_the_pause_not_pass_1(hosts: Any) -> None:
    src, guest = hosts.boot()
    guest.run("dirty 4")
    guest.wait_working_set(4)
    dst = hosts.destination(faults={"build": "hold"})  # its VPs come HOLD_SECONDS late
    result = migrate_worker(src, dst.wait_listening(), TOKEN, {"verify": True})
    assert dst.wait_migrated(30) is not None
    there = moved(dst)
    first, later = wait_rising(there.touched)
    assert later > first, "the dirty workload stopped at the destination"
    # pass 1 went into the RAM while the VPs were still being built; the pause came after
    # them (the RAM checksum at pause matched: verify)
    assert result["pass_log"][0]["pages"] >= 4 * 256
    assert result["pass_log"][0]["seconds"] < HOLD_SECONDS
    assert result["total_time"] >= HOLD_SECONDS
    assert result["downtime"] < HOLD_SECONDS


def test_a_build_that_fails_after_ready_fails_the_migration_and_the_source_runs_on(
    hosts: Any,
) -> None:
    src, guest = hosts.boot()
    guest.run("dirty 4")
    dst = hosts.destination(faults={"build": "fail"})
    with pytest.raises(MigrationError, match="injected failure at build"):
        # paced: the source is still in pass 1 when the build fails
        migrate_worker(src, dst.wait_listening(), TOKEN, {"bandwidth": 2_000_000})
    assert src.end is None
    first, later = wait_rising(guest.touched)
    assert later > first, "the source's workload stopped"
    end = dst.wait(30)
    assert end is not None and end.reason != "stopped", end
    assert dst.wait_migrated(0) is None
