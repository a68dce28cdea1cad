"""A VM created with a page file through the VMMS: its jailed worker reaches the page file (in
the VMMS's state directory, the VM's uid's own, bound into the jail), and a guest trimmed below
its committed memory pages out into it."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.support.wait import wait_for
from tests.vmms.vmms_process import vmms_host

pytestmark = pytest.mark.guest


def test_a_jailed_worker_pages_its_guest_out_to_the_page_file_in_the_vms_directory(
    tmp_path: Path,
) -> None:
    if os.geteuid() != 0:
        pytest.fail("the jail needs root: run this test as root")
    with vmms_host(tmp_path) as host:
        host.vm(
            "create", "pg", "--memory", "256M", "--dynamic", "--minimum", "64M",
            "--maximum", "256M", "--page-file-size", "64M",
        )  # fmt: skip
        host.vm("start", "pg")
        shown = host.show("pg")
        assert shown["settings"]["page_file_size"] == 64 << 20
        host.console_until("pg", "mem", b"hot-added")  # booted: the shell answers
        disk = host.shell("pg", "disk", b"errors: ")
        assert "(64 MiB) on channel 2" in disk, disk
        host.wait_for_dm_report("pg")
        # testlimit's 128 MiB, then a target below it plus the guest's floor: it pages out
        assert "committed 128 MiB" in host.shell("pg", "testlimit -m 128 -c 1", b"committed")

        def filled() -> bool:
            m = re.search(r"filled (\d+)", host.shell("pg", "tasks", b"filled"))
            return bool(m and int(m[1]) == 128 * 256)

        wait_for(filled, 60, "testlimit's pages written")
        host.vm("memory", "pg", "--target", "150M")

        def paged() -> int:
            m = re.search(r"page-outs: (\d+)", host.shell("pg", "paging", b"failures"))
            return int(m[1]) if m else 0

        outs = wait_for(paged, 120, "the guest paging out")
        # the VMMS has it from the guest's DM status: the page file and the pages written to it
        mem = wait_for(
            lambda: (
                (m := host.client.request("GET", "/api/vms/pg/memory"))["page_file_writes"] and m
            ),
            30,
            "page_file_writes in the VM's memory status",
        )
        assert mem["page_file"] == 64 << 20 and mem["page_file_writes"] > 0
        page_file = host.state / "pagefiles" / "pg.pagefile"
        st = page_file.stat()
        assert st.st_uid == shown["jail_uid"], "the page file is the VM's uid's own"
        assert st.st_size == 64 << 20 and st.st_blocks * 512 >= outs * 4096 // 2
        host.vm("stop", "pg")
        host.vm("delete", "pg")
        assert not page_file.exists(), "a deleted VM's page file goes with it"
