"""A running VM moves to another host while it runs (the book's live migration): memory is
copied while the guest writes, copied again, the VP and device state follow, and the guest goes
on at the destination, its shell answering, its timer ticking, its workloads running, its
memory byte-identical to what it was at the pause (checked by the destination against the
source's checksum before it resumes)."""

from __future__ import annotations

from typing import Any

import pytest

from pyhv.counters import CounterRegistry
from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved, wait_rising

pytestmark = pytest.mark.kvm


def _migrate(src: Any, dst: Any, counters: Any = None, **options: Any) -> dict[str, Any]:
    progress: list[dict[str, Any]] = []
    options.setdefault("verify", True)
    result = migrate_worker(
        src, dst.wait_listening(), TOKEN, options, on_progress=progress.append, counters=counters
    )
    assert dst.wait_migrated(30) is not None
    end = src.wait(30)
    assert end is not None and end.reason == "stopped" and "migrated to" in end.detail
    assert progress and progress[-1]["phase"] == "done"
    return result


def test_an_idle_guest_moves_to_another_host_and_its_shell_answers_there(hosts: Any) -> None:
    src, guest = hosts.boot()
    before = guest.ticks()
    dst = hosts.destination()
    registry = CounterRegistry()
    result = _migrate(src, dst, counters=registry)
    there = moved(dst)
    first, later = wait_rising(there.ticks)
    assert before <= first < later
    assert "visible: 128 MiB" in there.run("mem")
    # never-written memory is not sent at all; what was sent is far below the RAM size
    assert result["skipped_pages"] > result["ram_pages"] // 2
    assert result["bytes_sent"] < 32 << 20
    # the migration's counters, as Perfmon would show them
    snap = registry.snapshot()
    assert snap["\\Hyper-V VM Live Migration(vm)\\Passes"] == result["passes"]
    assert snap["\\Hyper-V VM Live Migration(vm)\\Bytes Sent"] == result["bytes_sent"]
    assert snap["\\Hyper-V VM Live Migration(vm)\\Downtime"] == result["downtime"] > 0


@pytest.mark.parametrize("mb", [16, 64])
def test_a_guest_dirtying_memory_keeps_dirtying_it_after_the_move(hosts: Any, mb: int) -> None:
    src, guest = hosts.boot("256M")
    guest.run(f"dirty {mb}")
    guest.wait_working_set(mb)
    dst = hosts.destination()
    result = _migrate(src, dst, downtime_target=0.05)
    there = moved(dst)
    first, later = wait_rising(there.touched)
    assert later > first, "the dirty workload stopped at the destination"
    assert there.ticks() > 0
    # every page the workload rewrote was sent at least once, and the passes were counted
    assert result["pages_sent"] >= mb * 256
    assert result["passes"] >= 2
    assert result["pass_log"][0]["pages"] >= mb * 256


def test_a_guest_migrated_there_and_back_still_runs_where_it_started(hosts: Any) -> None:
    a, guest = hosts.boot("128M")
    guest.run("dirty 8")
    b = hosts.destination()
    _migrate(a, b)
    there = moved(b)
    wait_rising(there.touched)
    c = hosts.destination()  # a fresh worker on the first host
    _migrate(b, c)
    back = moved(c)
    first, later = wait_rising(back.touched)
    assert later > first
    assert "visible: 128 MiB" in back.run("mem")


def test_compressed_and_bandwidth_limited_streams_carry_the_same_memory(hosts: Any) -> None:
    src, guest = hosts.boot("128M")
    guest.run("testlimit -m 8 -c 1")
    dst = hosts.destination()
    result = _migrate(src, dst, compress=True, bandwidth=64 << 20)
    # the RAM checksum matched (or the destination would not have resumed); zstd shrank it
    assert result["bytes_sent"] < result["pages_sent"] * 4096
    assert moved(dst).ticks() > 0


def test_a_guest_that_dirties_faster_than_the_link_is_throttled_then_given_up(
    hosts: Any,
) -> None:
    src, guest = hosts.boot("128M")
    guest.run("dirty 8")
    wait_rising(guest.touched)
    dst = hosts.destination()
    from pyhv.migration import MigrationError

    with pytest.raises(MigrationError, match="did not converge") as err:
        migrate_worker(
            src,
            dst.wait_listening(),
            TOKEN,
            {"bandwidth": 16 << 20, "max_passes": 3, "max_downtime": 0.01, "downtime_target": 0.01},
        )
    assert "throttle" in str(err.value)
    # the source VM goes on as before
    first, later = wait_rising(guest.touched)
    assert later > first
    assert src.end is None
    assert dst.wait(30) is not None
