"""A VM that arrives by live migration while the destination's disk is full (its state
directory a filled tmpfs), between two real `pyhv vmms serve` and the reference guest: it runs
at the destination and stays watched (its shell answers; stopped, its memory is back in the
pool), and the destination's migration record says its settings could not be saved."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest

MIB = 1 << 20


def _fill_but_one_page(directory: Path) -> None:
    """Fill the tmpfs with one-page files, then free one: room for the jail's uid file, none for
    the VM's settings."""
    i = 0
    while True:
        try:
            (directory / f"filler{i}").write_bytes(b"\0" * 4096)
        except OSError:
            (directory / f"filler{i}").unlink(missing_ok=True)
            break
        i += 1
    (directory / "filler0").unlink()


def test_a_vm_arriving_on_a_full_disk_runs_watched_and_the_error_is_reported(
    tmp_path: Path,
) -> None:
    state_b = tmp_path / "b"
    state_b.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(state_b)], check=True)
    try:
        a = VmmsProcess(tmp_path, "a", "3G")
        try:
            b = VmmsProcess(tmp_path, "b", "1G")
            try:
                free_b = b.free()
                a.vm("create", "vm1", "--memory", "256M")
                a.vm("start", "vm1")
                _fill_but_one_page(state_b)
                out = a.vm("migrate", "vm1", "--to", b.address, "--token-file", str(b.token_file))
                assert f"vm1 runs on {b.address} now" in out, out
                recs = b.client.request("GET", "/api/migrations")["migrations"]
                assert "could not be saved" in recs[-1]["error"], recs
                assert b.state_of("vm1") == "running" and b.free() == free_b - 256 * MIB
                assert not (state_b / "vms" / "vm1.json").exists()
                assert "visible" in b.shell("vm1", "mem", b"visible")
                # Watched: its end is seen and its memory returns to B's pool.
                b.vm("stop", "vm1")
                for _ in range(200):
                    if b.free() == free_b:
                        break
                    time.sleep(0.05)
                assert b.free() == free_b and b.state_of("vm1") != "running"
            finally:
                b.close()
        finally:
            a.close()
    finally:
        subprocess.run(["umount", "-l", str(state_b)], check=False)
