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
