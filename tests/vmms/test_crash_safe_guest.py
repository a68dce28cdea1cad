"""Crash-safe state against a real `pyhv vmms serve` whose state directory is a full disk (a
1 MiB tmpfs, filled): a change of a running guest's Dynamic Memory range is refused with a
message that says why, nothing of it is stored or reaches the VM, and the guest runs on; once
there is room the same change is stored."""

from __future__ import annotations

import errno
import json
import subprocess
from pathlib import Path

import pytest

from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def test_a_full_disk_refuses_a_memory_change_and_the_guest_runs_on(tmp_path: Path) -> None:
    state = tmp_path / "a"
    state.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state)], check=True)
    try:
        host = VmmsProcess(tmp_path, "a", "1G")
        try:
            host.vm("create", "g", "--memory", "128M", "--dynamic", "--maximum", "256M")
            host.vm("start", "g")
            stored = state / "vms" / "g.json"
            before = stored.read_text()
            filler = _fill(state)
            out = host.vm("memory", "g", "--maximum", "512M", check=False)
            assert "could not be saved" in out and "No space left" in out, out
            assert stored.read_text() == before
            settings = host.client.request("GET", "/api/vms/g")["settings"]
            assert settings["maximum"] == 256 << 20
            assert "visible" in host.shell("g", "mem", b"visible")  # the guest runs on
            filler.unlink()
            host.vm("memory", "g", "--maximum", "512M")
            assert json.loads(stored.read_text())["maximum"] == 512 << 20
            host.vm("stop", "g")
        finally:
            host.close()
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
