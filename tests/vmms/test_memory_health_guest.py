"""Hyper-V Manager's Memory Demand and Memory Status on a real guest under a real VMMS: a VM held
below demand plus its buffer by its maximum shows Low, one whose demand passes its maximum shows
Warning, and both clear when testlimit is killed; `pyhv vm list`, `pyhv vm show` and the
"Hyper-V Dynamic Memory VM" counters say so. `pyhv vm memory` takes Set-VMMemory's names."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest

MIB = 1 << 20
COUNTERS = r"\Hyper-V Dynamic Memory VM(dm)"


def _memory_when(host: VmmsProcess, status: str, timeout: float = 120) -> dict[str, Any]:
    """The VM's memory once its Memory Status is `status` (the guest reports once a second)."""
    memory: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        memory = host.client.request("GET", "/api/vms/dm").get("memory") or {}
        if memory.get("status") == status:
            return memory
        time.sleep(0.2)
    raise AssertionError(f"Memory Status never became {status}: {memory}")


def _counter_when(host: VmmsProcess, value: float, timeout: float = 30) -> dict[str, float]:
    counters: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counters = host.client.request("GET", "/api/counters")["counters"]
        if counters.get(COUNTERS + r"\Memory Status") == value:
            return counters
        time.sleep(0.2)
    raise AssertionError(f"Memory Status counter never {value}: {counters}")


def _listed(host: VmmsProcess) -> str:
    out = host.vm("list")
    assert "DEMAND" in out and "STATUS" in out, out
    return next(line for line in out.splitlines() if line.startswith("dm "))


def test_memory_status_goes_low_and_warning_and_clears_on_a_real_guest(tmp_path: Path) -> None:
    host = VmmsProcess(tmp_path, "h", "3G")
    try:
        host.vm(
            "create", "dm", "--memory", "256M", "--dynamic", "--minimum", "128M",
            "--maximum", "512M",
        )  # fmt: skip
        host.vm("start", "dm")
        idle = _memory_when(host, "OK")
        # Set-VMMemory's names on a running VM: buffer and priority (weight) change.
        host.vm("memory", "dm", "--buffer", "25", "--priority", "80")
        settings = host.client.request("GET", "/api/vms/dm")["settings"]
        assert (settings["buffer"], settings["weight"]) == (25, 80), settings
        # Startup memory of a running VM is a resize (test_memory_resize_guest.py): in 2M blocks.
        out = host.vm("memory", "dm", "--startup", "301M", check=False)
        assert "is not a multiple of 2M" in out, out

        # Low: demand fits in the 512 MiB maximum, demand + 25 % does not.
        base = idle["demand"] // MIB
        assert base < 400, idle
        host.shell("dm", f"testlimit -m {470 - base}", b"committed")
        low = _memory_when(host, "Low")
        assert low["demand"] <= 512 * MIB < low["demand"] * 1.25, low
        assert " Low " in _listed(host)
        assert "memory status Low" in host.vm("show", "dm")
        assert host.client.request("GET", "/api/vms/dm")["memory"]["demand"] >= 460 * MIB
        _counter_when(host, 1)
        host.shell("dm", "kill", b"pyhv>")
        _memory_when(host, "OK")

        # Warning: demand beyond the maximum: the host may not give it what it commits.
        host.shell("dm", f"testlimit -m {600 - base}", b"committed")
        warning = _memory_when(host, "Warning")
        assert warning["demand"] > 512 * MIB >= warning["assigned"], warning
        line = _listed(host)
        assert " Warning " in line and "512M" in line, line
        shown = host.vm("show", "dm")
        assert "memory status Warning" in shown, shown
        counters = _counter_when(host, 2)
        assert counters[COUNTERS + r"\Memory Demand"] > 512, counters
        host.shell("dm", "kill", b"pyhv>")
        _memory_when(host, "OK")
        assert " OK " in _listed(host)
        _counter_when(host, 0)
    finally:
        host.close()
