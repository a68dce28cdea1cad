"""Runtime memory resize (Set-VMMemory -StartupBytes on a running VM) through a real VMMS and the
reference guest: `pyhv vm memory NAME --memory SIZE` hot-adds to grow and hot-removes to shrink,
Guest Visible Physical Memory follows in `pyhv vm show --json` and in the guest's own figures,
the worker's host memory falls after the shrink, the stored startup memory follows what is
visible, a guest that cannot vacate memory in use gives less and the command says so with the
figures, and bad sizes are refused with their reason."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.wait import wait_for
from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest

MIB = 1 << 20


def _guest_mem(host: VmmsProcess) -> dict[str, int]:
    out = host.shell("dm", "mem", b"visible")
    return {k: int(v) for k, v in re.findall(r"^([a-z-]+): (\d+) MiB\r?$", out, re.M)}


def _kernel_ram(host: VmmsProcess) -> int:
    return int(host.show("dm")["enforcement"]["kernel_ram"] or 0)


def test_a_running_vm_grows_and_shrinks_and_says_what_its_guest_gave(tmp_path: Path) -> None:
    host = VmmsProcess(tmp_path, "h", "1G")  # 768 MiB for VMs
    try:
        host.vm(
            "create", "dm", "--memory", "256M", "--dynamic", "--minimum", "128M",
            "--maximum", "1G",
        )  # fmt: skip
        host.vm("start", "dm")
        host.wait_for_dm_report("dm")

        # bad sizes: refused with the reason, nothing changed
        out = host.vm("memory", "dm", "--memory", "1G", check=False)
        assert "above the host's free memory 512M" in out, out
        out = host.vm("memory", "dm", "--memory", "385M", check=False)
        assert "is not a multiple of 2M" in out, out
        out = host.vm("memory", "dm", "--memory", "64M", check=False)
        assert "below VM 'dm''s minimum 128M" in out, out
        out = host.vm("memory", "dm", "--maximum", "512M", check=False)
        assert "maximum can only go up" in out and "--memory SIZE" in out, out
        assert host.show("dm")["settings"]["memory"] == 256 * MIB

        # grow: hot-add of the difference
        out = host.vm("memory", "dm", "--memory", "512M")
        assert "256M -> 512M (added 256M); startup memory 512M" in out, out
        shown = host.show("dm")
        assert shown["memory"]["visible"] == 512 * MIB
        assert shown["settings"]["memory"] == 512 * MIB
        mem = _guest_mem(host)
        assert mem["visible"] == 512 and mem["hot-added"] == 256, mem

        # use memory in the hot-added region, free it, keep it on the host (no hints)
        assert "no more free-page hints" in host.shell("dm", "dm nohints")
        assert "committed 300 MiB" in host.shell("dm", "testlimit -m 300 -c 1", b"committed")
        before = wait_for(
            lambda: (k := _kernel_ram(host)) >= 300 * MIB and k,
            60,
            "the guest's 300 MiB resident on the host",
        )
        assert "released" in host.shell("dm", "kill", b"released")
        # part of it ballooned: a shrink gives the balloon back first, then hot-removes
        host.vm("memory", "dm", "--target", "384M")
        wait_for(
            lambda: host.show("dm")["memory"]["ballooned"] == 128 * MIB,
            60,
            "128M ballooned",
        )

        # shrink: hot-remove of the difference; the region leaves the guest and the host
        out = host.vm("memory", "dm", "--memory", "256M")
        assert "512M -> 256M (removed 256M); startup memory 256M" in out, out
        # (assigned follows the worker's next status push)
        shown = wait_for(
            lambda: (s := host.show("dm"))["memory"]["assigned"] == 256 * MIB and s,
            30,
            "assigned memory following the shrink to 256M",
        )
        assert shown["memory"]["visible"] == 256 * MIB, shown
        assert shown["memory"]["ballooned"] == 0
        assert shown["settings"]["memory"] == 256 * MIB
        mem = _guest_mem(host)
        assert mem["visible"] == 256 and mem["hot-added"] == 0, mem
        # (the VMMS reads the worker's memfd blocks once a second)
        after = wait_for(
            lambda: (k := _kernel_ram(host)) <= 256 * MIB and k,
            30,
            f"the worker's guest RAM on the host falling from {before >> 20} MiB",
        )
        assert before - after >= 40 * MIB, (before >> 20, after >> 20)

        # a guest that cannot vacate memory in use gives less: said, with the figures
        host.vm("memory", "dm", "--memory", "512M")
        assert "committed 320 MiB" in host.shell("dm", "testlimit -m 320 -c 1", b"committed")
        out = host.vm("memory", "dm", "--memory", "128M", check=False)
        m = re.search(
            r"asked to shrink to 128M \(remove 384M\); the guest removed (\d+)M: it could not "
            r"vacate the rest \(memory in use\); Guest Visible Physical Memory is now (\d+)M; "
            r"startup memory is now (\d+)M",
            out,
        )
        assert m, out
        removed, visible, startup = (int(g) for g in m.groups())
        assert removed < 384 and visible == 512 - removed and startup == visible, out
        assert visible >= 320  # what the task committed stayed
        assert host.show("dm")["settings"]["memory"] == visible * MIB
        assert "committed 320 MiB" in host.shell("dm", "tasks", b"committed")
    finally:
        host.close()
