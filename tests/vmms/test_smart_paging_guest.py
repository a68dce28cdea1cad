"""Smart Paging on a real guest under a real VMMS: on a host whose pool cannot give a Dynamic
Memory VM its startup memory, a plain start is refused, a restart starts it anyway with the part
the host lacks in its Smart Paging file (`pyhv vm show` and the counters say so); the guest runs
and its memory reaches the file; when other memory frees, the pages move into host memory with
their contents (the words testlimit wrote, read from the file before and from the worker's
memfd after), the file is deleted, and show and the counters say Smart Paging is not in use."""

from __future__ import annotations

import hashlib
import mmap
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pyhv.kvm import address_of
from pyhv.vmms.client import ClientError
from pyhv.worker.hostmem import resident_bytes
from tests.support.wait import wait_for
from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest

MIB = 1 << 20
PAGE = 4096
COUNTERS = r"\Hyper-V Dynamic Memory VM(sp)"


def _data_offsets(fd: int, size: int) -> list[int]:
    """Offsets of the pages of `fd` that hold data (holes skipped), not read."""
    offsets: list[int] = []
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        offsets += range(data - data % PAGE, hole, PAGE)
        pos = hole
    return offsets


def _data_pages(fd: int, size: int) -> dict[int, bytes]:
    """{offset: the page's bytes} of every page of `fd` that holds data (holes skipped)."""
    return {off: os.pread(fd, PAGE, off) for off in _data_offsets(fd, size)}


def _testlimit_pages(pages: dict[int, bytes], base_gpa: int) -> dict[int, bytes]:
    """The pages whose first word is their own guest physical address: testlimit's."""
    return {off: p for off, p in pages.items() if int.from_bytes(p[:8], "little") == base_gpa + off}


def _paged_out(path: Path, size: int) -> int:
    """Bytes of the file that hold data but are not in memory (mincore; nothing read)."""
    fd = os.open(path, os.O_RDWR)  # a writable mapping (address_of), never written
    try:
        data = _data_offsets(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED) as m:
            base = address_of(m)
            resident = sum(resident_bytes(base + off, PAGE) for off in data)
    finally:
        os.close(fd)
    return len(data) * PAGE - resident


def _smart_paging(host: VmmsProcess) -> dict[str, Any]:
    return host.show("sp")["memory"]["smart_paging"]  # type: ignore[no-any-return]


def _memfd_of_size(pid: int, size: int) -> int:
    """An fd (ours) on the worker's guest-RAM memfd of `size` bytes."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{fd}")
        if link.startswith("/memfd:") and os.stat(f"/proc/{pid}/fd/{fd}").st_size == size:
            return os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    raise AssertionError(f"worker {pid} holds no memfd of {size} bytes")


def test_a_restart_on_a_short_host_runs_on_smart_paging_until_memory_frees(
    tmp_path: Path,
) -> None:
    host = VmmsProcess(tmp_path, "h", "1280M")  # 1024M for VMs (256M host reserve)
    try:
        host.vm("create", "hog", "--memory", "640M")
        # Its minimum is what the pool can give: ballooning cannot end Smart Paging, only
        # memory another VM frees can.
        host.vm(
            "create", "sp", "--memory", "512M", "--dynamic", "--minimum", "384M",
            "--maximum", "512M",
        )  # fmt: skip
        host.vm("start", "hog")
        assert host.free() == 384 * MIB

        # A start from off is refused, as in Hyper-V; a restart is not.
        refused = host.vm("start", "sp", check=False)
        assert "not enough host memory" in refused and "pyhv vm restart sp" in refused, refused
        shown = host.vm("restart", "sp")
        assert "Smart Paging: in use, 128M" in shown, shown
        sp = _smart_paging(host)
        assert sp["in_use"] and sp["bytes"] == 128 * MIB, sp
        path = Path(sp["file"])
        assert path.parent == host.state / "vms" / "sp" and path.stat().st_size == 128 * MIB
        assert host.free() == 0
        counters = host.client.request("GET", "/api/counters")["counters"]
        assert counters[COUNTERS + r"\Smart Paging In Use"] == 1, counters
        assert counters[COUNTERS + r"\Smart Paging Working Set Size"] == 128, counters

        # The VM runs: its console answers, and what it commits reaches the file.
        host.wait_for_dm_report("sp")
        assert "committed" in host.shell("sp", "mem", b"committed")
        host.shell("sp", "testlimit -m 470", b"committed")
        base = 384 * MIB  # the file backs the top 128 MiB of the VM's 512 MiB
        # The worker's memory cgroup (its limit: assigned memory + overhead, the file
        # excluded) fills: the kernel writes the file's pages back and drops them from
        # memory, and the worker runs on. That is the paging: data in the file, not resident.
        paged_out = wait_for(
            lambda: _paged_out(path, 128 * MIB), 120, "file pages written back and dropped"
        )
        enforcement = host.show("sp")["enforcement"]
        assert enforcement["cgroup_usage"] <= enforcement["cgroup_limit"], enforcement
        assert host.state_of("sp") == "running"
        fd = os.open(path, os.O_RDONLY)
        try:
            before = wait_for(
                lambda: (
                    len(_testlimit_pages(_data_pages(fd, 128 * MIB), base)) >= 8192
                    and _testlimit_pages(_data_pages(fd, 128 * MIB), base)
                ),
                120,
                "testlimit's pages in the Smart Paging file",
                interval=0.5,
            )
        finally:
            os.close(fd)
        assert isinstance(before, dict)
        digest = hashlib.sha256(b"".join(before[o] for o in sorted(before))).hexdigest()
        with pytest.raises(ClientError, match="Smart Paging"):
            host.client.request(
                "POST", "/api/vms/sp/migrate", {"destination": "127.0.0.1:9", "token": "t"}
            )

        # Other memory frees: the pages move into host memory and the file goes.
        t0 = time.monotonic()
        host.vm("stop", "hog")
        wait_for(lambda: not _smart_paging(host)["in_use"], 60, "Smart Paging to end")
        ended = _smart_paging(host)
        assert ended["ended_after_s"] is not None and ended["file"] is None, ended
        assert not path.exists()
        took = time.monotonic() - t0
        shown = host.vm("show", "sp")
        assert "Smart Paging: not in use (the last ended after" in shown, shown
        counters = host.client.request("GET", "/api/counters")["counters"]
        assert counters[COUNTERS + r"\Smart Paging In Use"] == 0, counters
        memory = host.show("sp")["memory"]
        assert memory["assigned"] == 512 * MIB - memory["ballooned"], memory

        # The words testlimit wrote are in the worker's memory now, page for page.
        pid = host.show("sp")["pid"]
        fd = _memfd_of_size(pid, 128 * MIB)
        try:
            after = {o: os.pread(fd, PAGE, o) for o in before}
        finally:
            os.close(fd)
        assert hashlib.sha256(b"".join(after[o] for o in sorted(after))).hexdigest() == digest
        # The guest runs on, its memory manager consistent.
        check = host.shell("sp", "pmmcheck", b"pmm:")
        assert "pmm: consistent" in check, check
        host.shell("sp", "kill", b"pyhv>")
        print(
            f"Smart Paging ended {took:.1f} s after the hog stopped: {ended}; "
            f"{paged_out >> 20} MiB of the file had been paged out"
        )
    finally:
        host.close()


def test_smart_paging_ends_when_the_balancer_balloons_an_idle_guest_down(tmp_path: Path) -> None:
    """A running VM restarted after another VM took the memory it had given up: on Smart
    Paging until the balancer, seeing its low demand, balloons it below what the pool holds."""
    host = VmmsProcess(tmp_path, "h", "1280M")
    try:
        host.vm(
            "create", "sp", "--memory", "512M", "--dynamic", "--minimum", "128M",
            "--maximum", "512M",
        )  # fmt: skip
        host.vm("create", "hog", "--memory", "640M")
        host.vm("start", "sp")
        assert not _smart_paging(host)["in_use"]
        # Idle, the guest is ballooned down; the memory it gave up goes to another VM.
        host.wait_for_dm_report("sp")
        host.vm("memory", "sp", "--target", "192M")
        wait_for(lambda: host.free() >= 640 * MIB, 120, "sp ballooned down")
        host.vm("start", "hog")
        shown = host.vm("restart", "sp")
        assert "Smart Paging: in use" in shown, shown
        assert _smart_paging(host)["bytes"] == 128 * MIB
        t0 = time.monotonic()
        wait_for(lambda: not _smart_paging(host)["in_use"], 180, "Smart Paging to end")
        took = time.monotonic() - t0
        ended = _smart_paging(host)
        memory = host.show("sp")["memory"]
        assert memory["ballooned"] > 0 and memory["assigned"] <= 384 * MIB, memory
        assert not (host.state / "vms" / "sp" / "smart-paging.slp").exists()
        assert "committed" in host.shell("sp", "mem", b"committed")
        print(f"Smart Paging of an idle guest ended after {took:.1f} s: {ended}")
    finally:
        host.close()
