"""VMs whose RAM is in 2 MiB pages (huge_pages: files on a private tmpfs, pyhv.memory.hugeram)
move like the others: one frees memory, hints it back to the host and moves live (the hinted
pages are holes, neither read nor sent); one moves by post-copy (its VPs fault their memory in
through userfaultfd on those files). The destination backs the RAM in 2 MiB pages too, and the
guest goes on whole (the destination checks the source's checksum)."""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

from pyhv.guest_image import image_path
from pyhv.migration.worker import migrate_worker
from pyhv.worker import VmConfig
from pyhv.worker.process import WorkerProcess
from tests.migration.conftest import TOKEN, Guest, moved
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB = 1 << 20


def _ram_files(pid: int) -> dict[int, tuple[str, int]]:
    """inode -> (what /proc shows, bytes allocated) of the worker's guest RAM files: memfds, or
    unnamed files (O_TMPFILE) on its private tmpfs."""
    out: dict[int, tuple[str, int]] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("/memfd:") or re.fullmatch(r"/#\d+ \(deleted\)", link):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                out[st.st_ino] = (link, st.st_blocks * 512)
        except OSError:
            continue  # closed meanwhile
    return out


def _ram_bytes(pid: int) -> int:
    return sum(n for _link, n in _ram_files(pid).values())


def _migrate(src: Any, dst: Any, **options: Any) -> dict[str, Any]:
    result = migrate_worker(src, dst.wait_listening(), TOKEN, options)
    assert dst.wait_migrated(30) is not None
    end = src.wait(30)
    assert end is not None and "migrated to" in end.detail
    return result


def _in_huge_pages(pid: int) -> bool:
    files = _ram_files(pid)
    return bool(files) and all(not link.startswith("/memfd:") for link, _n in files.values())


def test_a_huge_page_vm_hints_its_freed_memory_and_moves_without_it(hosts: Any) -> None:
    cfg = VmConfig.create(
        image=image_path(),
        memory="512M",
        dynamic_memory=True,
        minimum="256M",
        maximum="512M",
        huge_pages=True,
    )
    src = WorkerProcess(cfg)
    src.start()
    try:
        guest = Guest(src)
        wait_for(lambda: src.memory_status()["negotiated"], 30, "Dynamic Memory negotiated")
        assert _in_huge_pages(src.pid)
        guest.run("testlimit -m 256 -c 1")
        guest.wait_working_set(256)
        held = _ram_bytes(src.pid)
        assert held >= 256 * MiB
        assert "released" in guest.run("kill")
        wait_for(
            lambda: held - _ram_bytes(src.pid) >= 240 * MiB, 30, "the freed memory left the host"
        )
        left = _ram_bytes(src.pid)
        guest.run("testlimit -m 32 -c 1")  # a working set that must arrive whole
        guest.wait_working_set(32)
        dst = hosts.destination()
        result = _migrate(src, dst, verify=True)
        # the hinted memory was neither read nor sent: the source held `left` bytes of data
        assert result["skipped_pages"] * 4096 >= 512 * MiB - left - 40 * MiB
        there = moved(dst)
        assert _in_huge_pages(dst.pid)
        assert _ram_bytes(dst.pid) <= left + 48 * MiB
        assert "committed 32 MiB" in there.run("tasks")
        assert "pmm: consistent" in there.run("pmmcheck")
    finally:
        src.close()


def test_a_huge_page_vm_moves_by_post_copy(hosts: Any) -> None:
    src = WorkerProcess(VmConfig.create(image=image_path(), memory="128M", huge_pages=True))
    src.start()
    try:
        guest = Guest(src)
        assert _in_huge_pages(src.pid)
        guest.run("dirty 16")
        guest.wait_working_set(16)
        dst = hosts.destination()
        # paced (8 MiB/s): the guest touches pages before they come, and faults them in
        result = _migrate(src, dst, postcopy=True, bandwidth=8 << 20)
        pc = result["postcopy"]
        assert pc["checksum_destination"] == pc["checksum_source"]
        assert pc["needed_pages"] >= 16 * 256
        assert pc["faults"] > 0 and pc["requested_pages"] > 0
        assert _in_huge_pages(dst.pid)
        there = moved(dst)
        assert "visible: 128 MiB" in there.run("mem")
        assert "pmm: consistent" in there.run("pmmcheck")
    finally:
        src.close()
