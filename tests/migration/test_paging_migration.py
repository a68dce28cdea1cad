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


def test_paged_out_pages_move_with_the_vm_and_come_back_intact_there(hosts: Any) -> None:
    from pyhv.guest_image import image_path
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    cfg = VmConfig.create(
        image=image_path(),
        memory="128M",
        dynamic_memory=True,
        minimum="64M",
        page_file_size="64M",
    )
    src = WorkerProcess(cfg)
    src.start()
    try:
        guest = Guest(src)
        _settled(src)
        guest.run("testlimit -m 48 -c 1")
        wait_for(
            lambda: paging_task(guest.run("tasks"))["filled"] == 48 * PAGES_PER_MIB,
            60,
            "testlimit's pages",
        )
        src.set_memory_target(112 << 20)  # below testlimit's 48 MiB plus the guest's floor
        assert _settled(src)["assigned_pages"] == 112 * PAGES_PER_MIB
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
    from pyhv.guest_image import image_path
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    cfg = VmConfig.create(
        image=image_path(), memory="256M", dynamic_memory=True, minimum="64M", page_file_size="128M"
    )
    src = WorkerProcess(cfg)
    src.start()
    try:
        guest = Guest(src)
        _settled(src)
        guest.run("testlimit -m 128 -c 1")
        wait_for(
            lambda: paging_task(guest.run("tasks"))["filled"] == 128 * PAGES_PER_MIB,
            60,
            "testlimit's pages",
        )
        src.set_memory_target(220 << 20)  # pages out about 15 MiB: what a state carries
        _settled(src)
        before = paging_task(guest.run("tasks"))
        assert before["paged_out"] > 2048
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
