"""A running VM moves to another host while it runs (the book's live migration): memory is
copied while the guest writes, copied again, the VP and device state follow, and the guest goes
on at the destination, its shell answering, its timer ticking, its workloads running, its
memory byte-identical to what it was at the pause (checked by the destination against the
source's checksum before it resumes)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from pyhv.counters import CounterRegistry
from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved, wait_rising
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest


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


def _guest_ram_bytes(pid: int) -> int:
    """Host memory allocated behind a worker's guest RAM (blocks of its memfds)."""
    blocks: dict[int, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:"):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                blocks[st.st_ino] = st.st_blocks * 512  # one memfd may be open twice
        except OSError:
            continue  # closed meanwhile
    return sum(blocks.values())


def _dm_settled(worker: Any, timeout: float = 30) -> dict[str, Any]:
    """The VM's Dynamic Memory status once negotiated and no goal is pending (bounded)."""

    def settled() -> dict[str, Any] | None:
        st: dict[str, Any] = worker.memory_status()
        idle = st["negotiated"] and st["goal_pages"] is None and st["operation"] is None
        return st if idle else None

    return wait_for(settled, timeout, "Dynamic Memory settled")


def test_a_ballooned_vm_moves_with_its_balloon_and_its_dm_channel_goes_on(hosts: Any) -> None:
    from pyhv.guest_image import image_path
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess
    from tests.migration.conftest import Guest

    cfg = VmConfig.create(
        image=image_path(), memory="256M", dynamic_memory=True, minimum="128M", maximum="512M"
    )
    src = WorkerProcess(cfg)
    src.start()
    try:
        guest = Guest(src)
        _dm_settled(src)
        guest.run("testlimit -m 128 -c 1")  # back 128 MiB with host memory, then free it
        guest.wait_working_set(128)
        guest.run("kill")
        src.set_memory_target(160 << 20)
        before = _dm_settled(src)
        assert before["ballooned_pages"] == 96 * 256
        src_ram = _guest_ram_bytes(src.pid)
        dst = hosts.destination()
        result = _migrate(src, dst)
        # the destination backs no more guest memory than the source did: the balloon stays out
        dst_ram = _guest_ram_bytes(dst.pid)
        assert 0 < dst_ram <= src_ram + (4 << 20), (src_ram, dst_ram)
        # ballooned pages were neither read nor sent
        assert result["skipped_pages"] >= before["ballooned_pages"]
        after = _dm_settled(dst)
        assert after["state"] == "IDLE" and after["protocol"] == before["protocol"]
        assert after["ballooned_pages"] == before["ballooned_pages"]
        assert after["assigned_pages"] == before["assigned_pages"]
        # the channel goes on: the guest's next status reports arrive at the destination
        reports = after["counters"]["status_reports"]
        wait_for(
            lambda: _dm_settled(dst)["counters"]["status_reports"] > reports,
            30,
            "a status report at the destination",
        )
        # and the destination can give the memory back and add more
        dst.set_memory_target(384 << 20)
        grown = _dm_settled(dst)
        assert grown["ballooned_pages"] == 0 and grown["hot_added_pages"] == 128 * 256
        assert "hot-added: 128 MiB" in moved(dst).run("mem")
        # hot-added memory moves too: mapped at the same GPA before the pages arrive
        back = hosts.destination()
        there = moved(dst)
        there.run("testlimit -m 300 -c 1")  # reaches into the hot-added region
        _migrate(dst, back)
        final = _dm_settled(back)
        assert final["hot_added_pages"] == 128 * 256 and final["visible_pages"] == 384 * 256
        again = moved(back)
        assert "hot-added: 128 MiB" in again.run("mem")
        assert "committed 300 MiB" in again.run("tasks")
    finally:
        src.close()


def test_a_vm_after_hot_remove_moves_with_the_same_guest_visible_memory(hosts: Any) -> None:
    """Hot-removed pages are offline: the layout carries them (MemoryState v2), they are not
    sent, and the destination accounts the same Guest Visible Physical Memory as the source."""
    from pyhv.guest_image import image_path
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess
    from tests.migration.conftest import Guest

    cfg = VmConfig.create(
        image=image_path(), memory="256M", dynamic_memory=True, minimum="128M", maximum="768M"
    )
    src = WorkerProcess(cfg)
    src.start()
    try:
        Guest(src)
        _dm_settled(src)
        src.set_memory_target(512 << 20)  # a 256 MiB region hot-added ...
        assert _dm_settled(src)["hot_added_pages"] == 256 * 256
        src.hot_remove_memory(128 * 256)  # ... half of it given back: free 2 MiB blocks
        before = _dm_settled(src)
        assert before["visible_pages"] == 384 * 256 and before["removed_pages"] == 128 * 256
        dst = hosts.destination()
        result = _migrate(src, dst)
        assert result["skipped_pages"] >= before["removed_pages"]
        after = _dm_settled(dst)
        for key in ("visible_pages", "assigned_pages", "hot_added_pages", "removed_pages"):
            assert after[key] == before[key], key
        assert after["hot_remove"] and after["state"] == "IDLE"
        there = moved(dst)
        mem = there.run("mem")
        assert "visible: 384 MiB" in mem and "hot-added: 128 MiB" in mem
        there.run("testlimit -m 300 -c 1")  # reaches into what is left of the region
        assert "committed 300 MiB" in there.run("tasks")
        there.run("kill")
        # the destination's VSP goes on: the rest of the region leaves whole
        dst.hot_remove_memory()
        final = _dm_settled(dst)
        assert final["visible_pages"] == 256 * 256 and final["removed_pages"] == 0
        assert "visible: 256 MiB" in there.run("mem")
    finally:
        src.close()


def test_several_streams_carry_a_dirtying_guest_whole_and_skip_zero_and_free_pages(
    hosts: Any,
) -> None:
    """Four TCP streams, each its own share of RAM from a thread of its own: the guest's
    memory arrives identical (the destination checks the RAM checksum at pause before it
    resumes), the workload goes on there, and only non-zero written pages crossed the wire."""
    src, guest = hosts.boot("256M")
    guest.run("dirty 32")
    guest.wait_working_set(32)
    dst = hosts.destination()
    result = _migrate(src, dst, streams=4, downtime_target=0.05)
    there = moved(dst)
    first, later = wait_rising(there.touched)
    assert later > first, "the dirty workload stopped at the destination"
    assert "visible: 256 MiB" in there.run("mem")
    assert result["pages_sent"] >= 32 * 256
    # never-written (holes) and zero pages went as nothing or as markers, never as page bytes:
    # the bytes on the wire are the pages sent plus at most 64 KiB of framing per MiB
    assert result["skipped_pages"] > result["ram_pages"] // 2
    # pass 1 covered all RAM, each page once: skipped, a zero marker, or sent
    assert (
        result["skipped_pages"] + result["zero_pages"] + result["pass_log"][0]["pages"]
        == (result["ram_pages"])
        or result["skipped_pages"] + result["pass_log"][0]["pages"] == result["ram_pages"]
    )
    page_bytes = result["pages_sent"] * 4096
    # each stream carried its share of the pages (equal page counts per pass)
    assert len(result["stream_bytes"]) == 4
    assert min(result["stream_bytes"]) > page_bytes / 8, result["stream_bytes"]
    assert page_bytes <= result["bytes_sent"] <= page_bytes * 1.07 + (1 << 20)


def test_compressed_encrypted_pages_over_three_streams_arrive_whole(hosts: Any) -> None:
    """Each sending thread compresses with its own zstd context and encrypts under its own
    stream's key; each receiving thread decrypts and decompresses into guest RAM (the RAM
    checksum at pause matched, or the destination would not have resumed)."""
    src, guest = hosts.boot("128M")
    guest.run("testlimit -m 8 -c 1")
    dst = hosts.destination()
    result = _migrate(src, dst, streams=3, compress=True, encrypt=True)
    # pages went over every stream (JOIN and the pass ends alone are ~200 bytes)
    assert len(result["stream_bytes"]) == 3 and min(result["stream_bytes"]) > 1024
    assert result["bytes_sent"] < result["pages_sent"] * 4096  # zstd shrank it
    there = moved(dst)
    first, later = wait_rising(there.ticks)
    assert later > first
