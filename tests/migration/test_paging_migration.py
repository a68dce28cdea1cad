"""A VM with pages in its page file moves to another host: the page file's written blocks travel
in the VM state (the storage VSP's own saved state), the destination writes them into its own
disk file, and the guest there pages them back in with every page's pattern intact."""

from __future__ import annotations

from typing import Any

import pytest

from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, Guest, moved
from tests.support.paging import paging_task, verify_pages
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

PAGES_PER_MIB = 256


def _settled(worker: Any) -> dict[str, Any]:
    def idle() -> dict[str, Any] | None:
        st: dict[str, Any] = worker.memory_status()
        return st if st["negotiated"] and st["goal_pages"] is None and not st["operation"] else None

    return wait_for(idle, 60, "Dynamic Memory settled")


def _paged(memory: str, page_file: str, testlimit_mib: int, target_mib: int) -> tuple[Any, Guest]:
    """A source worker whose guest wrote `testlimit_mib` MiB with testlimit, then was trimmed to
    `target_mib` MiB: below that plus its floor, so part of it is in the page file."""
    from pyhv.guest_image import image_path
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    cfg = VmConfig.create(
        image=image_path(),
        memory=memory,
        dynamic_memory=True,
        minimum="64M",
        page_file_size=page_file,
    )
    src = WorkerProcess(cfg)
    src.start()
    try:
        guest = Guest(src)
        _settled(src)
        guest.run(f"testlimit -m {testlimit_mib} -c 1")
        wait_for(
            lambda: paging_task(guest.run("tasks"))["filled"] == testlimit_mib * PAGES_PER_MIB,
            60,
            "testlimit's pages",
        )
        src.set_memory_target(target_mib << 20)
        assert _settled(src)["assigned_pages"] == target_mib * PAGES_PER_MIB
    except BaseException:
        src.close()
        raise
    return src, guest


def test_paged_out_pages_move_with_the_vm_and_come_back_intact_there(hosts: Any) -> None:
    src, guest = _paged("128M", "64M", 48, 112)
    try:
        before = paging_task(guest.run("tasks"))
        assert before["paged_out"] > 0
        dst = hosts.destination()
        migrate_worker(src, dst.wait_listening(), TOKEN, {"verify": True})
        assert dst.wait_migrated(30) is not None
        there = moved(dst)
        after = paging_task(there.run("tasks"))
        assert after["paged_out"] == before["paged_out"]
        t = verify_pages(there.run)
        assert t["checked"] == 48 * PAGES_PER_MIB and t["bad"] == 0
        paging = there.values("paging")
        assert paging["page-ins"] == before["paged_out"] and paging["failures"] == 0
    finally:
        src.close()


def test_pages_read_in_from_the_page_file_during_the_move_arrive_as_read(hosts: Any) -> None:
    """The storage VSP writes the pages it reads in from the host side, where KVM's dirty log
    does not see it: the final pass sends them again, and the destination's RAM checksum
    matches the source's (the migration's verify) while the guest pages in throughout."""
    src, guest = _paged("256M", "128M", 128, 220)  # about 15 MiB paged out: what a state carries
    try:
        assert paging_task(guest.run("tasks"))["paged_out"] > 2048
        assert "verify: 1 testlimit tasks" in guest.run("verify")  # pages in from now on
        dst = hosts.destination()
        migrate_worker(src, dst.wait_listening(), TOKEN, {"verify": True})
        assert dst.wait_migrated(30) is not None
        there = moved(dst)
        t = wait_for(
            lambda: (t := paging_task(there.run("tasks")))["verified"] == 1 and t,
            120,
            "the check begun at the source",
        )
        assert t["checked"] == 128 * PAGES_PER_MIB and t["bad"] == 0
        assert there.values("paging")["failures"] == 0
    finally:
        src.close()
