"""A guest that pages, with the reference guest: its storage VSC finds the page file's disk on
VMBus; testlimit's memory lives in a paging window; when the host trims the VM below what
testlimit committed, the guest pages the least recently used pages out to the disk (a host
file), reports it in its Dynamic Memory status, and pages them back in when the task touches
them again, every page's pattern intact."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from pyhv.guest_image import image_path
from pyhv.worker import VirtualMachine, VmConfig
from tests.guest.shell import Shell
from tests.support.paging import paging_task, verify_pages
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB = 1 << 20
PAGES_PER_MIB = 256


@pytest.fixture
def paging_vm(tmp_path: Path) -> Iterator[tuple[VirtualMachine, Shell, Path]]:
    disk = tmp_path / "vm.pagefile"
    cfg = VmConfig.create(
        image=image_path(),
        dynamic_memory=True,
        startup="256M",
        minimum="64M",
        maximum="256M",
        page_file_size="128M",
        page_file=disk,
    )
    vm = VirtualMachine(cfg)
    try:
        vm.start()
        sh = Shell(vm)
        assert (
            "storage: disk of 128 MiB" in sh.banner and "paging: page file of 128 MiB" in sh.banner
        )
        assert wait_for(lambda: vm.dynmem and vm.dynmem.negotiated, 30, "DM negotiated")
        yield vm, sh, disk
    finally:
        vm.close()


def test_the_guests_vsc_writes_and_reads_its_disk(
    paging_vm: tuple[VirtualMachine, Shell, Path],
) -> None:
    vm, sh, disk = paging_vm
    assert "wrote 100 pages, read them back: 0 bad, 0 failed requests" in sh.run("disk test 100")
    d = sh.values("disk")
    assert d["reads"] == d["writes"] == 7  # 16 pages a request
    assert vm.storage is not None and vm.storage.status()["written_bytes"] == 100 * 4096
    first = np.frombuffer(disk.read_bytes()[:4096], "<u8")
    assert (first == first[0]).all() and first[0] != 0  # the guest's pattern for page 0


def test_a_vm_trimmed_below_its_committed_memory_pages_out_and_its_pages_come_back_intact(
    paging_vm: tuple[VirtualMachine, Shell, Path],
) -> None:
    vm, sh, disk = paging_vm
    assert "committed 128 MiB" in sh.run("testlimit -m 128 -c 1")
    wait_for(
        lambda: paging_task(sh.run("tasks"))["filled"] == 128 * PAGES_PER_MIB,
        60,
        "testlimit wrote its pages",
    )
    committed = sh.values("mem")["committed"]
    assert committed >= 128
    # the host takes the VM down to 150 MiB: below testlimit's 128 MiB plus the guest's floor,
    # so the guest pages out to balloon
    vm.set_memory_target(150 * MiB)
    assert vm.wait_memory_idle(180)
    st = vm.memory_status()
    assert st["last_error"] is None and st["assigned_pages"] == 150 * PAGES_PER_MIB
    paging = sh.values("paging")
    assert paging["page-outs"] > 0 and paging["failures"] == 0
    paged_out = paging_task(sh.run("tasks"))["paged_out"]
    assert paged_out > 0 and paged_out == paging["page-outs"]
    # the DM status reports the page file and its writes: a report sent before the last
    # page-out carries fewer; the guest reports each second, so one after it carries them all
    last = wait_for(
        lambda: (
            (s := vm.memory_status()["last_status"])
            and s["page_file_writes"] == paging["page-outs"]
            and s
        ),
        30,
        f"a status report with page_file_writes {paging['page-outs']} (the guest's page-outs)",
    )
    assert last["page_file_pages"] == 128 * PAGES_PER_MIB
    # the host file holds the written blocks: testlimit's pages, each with its pattern
    assert vm.storage is not None
    written = list(vm.storage.disk.written)
    assert sum(r.count for r in written) == paging["page-outs"]
    data = disk.read_bytes()
    for r in written[:4]:
        page = np.frombuffer(data[r.start * 4096 : (r.start + 1) * 4096], "<u8")
        assert (np.diff(page) == 1).all(), "a paged-out page of testlimit's pattern"
    # testlimit checks every page: the paged-out ones come back through the page fault path
    t = verify_pages(sh.run)
    assert t["checked"] == 128 * PAGES_PER_MIB and t["bad"] == 0
    paging = sh.values("paging")
    assert paging["page-ins"] == paged_out and paging["failures"] == 0
    assert vm.storage.status()["counters"]["refused"] == 0
    # the guest unmapped each slot it read back: the host file holds nothing any more
    assert vm.storage.disk.written.pages == 0
    assert disk.stat().st_blocks * 512 < 1 << 20


def test_a_task_killed_with_pages_in_the_page_file_frees_its_slots_and_frames(
    paging_vm: tuple[VirtualMachine, Shell, Path],
) -> None:
    vm, sh, _ = paging_vm
    assert "committed 128 MiB" in sh.run("testlimit -m 128 -c 1")
    wait_for(lambda: paging_task(sh.run("tasks"))["filled"] == 128 * PAGES_PER_MIB, 60, "its pages")
    vm.set_memory_target(150 * MiB)
    assert vm.wait_memory_idle(180)
    assert re.search(r"page-file: \d+ pages \(128 MiB\), [1-9]\d* in use", sh.run("paging"))
    # the disk is the page file's now: a test write would overwrite paged-out pages
    assert "not overwriting them" in sh.run("disk test 8")
    assert "killed: 128 MiB released" in sh.run("kill")
    assert "128 MiB), 0 in use" in sh.run("paging")
    assert sh.run("pmmcheck").strip() == "pmm: consistent"
    assert sh.values("mem")["committed"] < 8
    # the memory and the page file serve a new task
    assert "committed 64 MiB" in sh.run("testlimit -m 64 -c 1")
    wait_for(lambda: paging_task(sh.run("tasks"))["filled"] == 64 * PAGES_PER_MIB, 60, "its pages")
    assert paging_task(sh.run("tasks"))["paged_out"] == 0
