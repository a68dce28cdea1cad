"""Post-copy live migration (Hines and Gopalan; QEMU's postcopy-ram): the VM's state moves
first and the guest runs at the destination at once; the pages it touches are fetched from the
source on demand (userfaultfd on the destination's guest RAM) ahead of a push of the rest, and
the source keeps its copy until the destination has every page. The RAM both sides add up
page by page must be the RAM at the pause."""

from __future__ import annotations

from typing import Any

import pytest

from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved, wait_rising

pytestmark = pytest.mark.guest


def _migrate(src: Any, dst: Any, **options: Any) -> dict[str, Any]:
    progress: list[dict[str, Any]] = []
    result = migrate_worker(src, dst.wait_listening(), TOKEN, options, on_progress=progress.append)
    assert dst.wait_migrated(30) is not None
    end = src.wait(30)
    assert end is not None and end.reason == "stopped" and "migrated to" in end.detail
    assert [p["phase"] for p in progress][-1] == "done"
    return result


def test_a_dirtying_guest_runs_at_the_destination_at_once_and_fetches_its_memory(
    hosts: Any,
) -> None:
    src, guest = hosts.boot("128M")
    guest.run("dirty 16")
    guest.wait_working_set(16)
    dst = hosts.destination()
    result = _migrate(src, dst, postcopy=True)
    pc = result["postcopy"]
    # RAM at the pause, as the destination added it up (pages kept + pages installed)
    assert pc["checksum_destination"] == pc["checksum_source"]
    # no pre-copy pass: every page the guest held came after the switch
    assert result["pass_log"] == []
    assert pc["needed_pages"] >= 16 * 256
    assert pc["urgent_pages"] + pc["pushed_pages"] >= pc["needed_pages"]
    # the guest ran before its memory was there: its VPs faulted and waited (blocktime)
    assert pc["faults"] > 0 and pc["requested_pages"] > 0
    assert 0 < pc["blocktime_p50_ms"] <= pc["blocktime_p99_ms"] <= pc["blocktime_max_ms"]
    there = moved(dst)
    first, later = wait_rising(there.touched)
    assert later > first, "the dirty workload stopped at the destination"
    assert "visible: 128 MiB" in there.run("mem")
