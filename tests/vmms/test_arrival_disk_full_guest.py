"""A VM migrating to a destination whose disk is full (its state directory a filled tmpfs),
between two real `pyhv vmms serve` and the reference guest: the destination cannot record the
VM as its own, so its worker never resumes it (a VM it could not find after a restart is a VM
that could be lost); the arrival is recorded at PREPARE, before the source pauses, so the
migration fails there and the source's copy runs on (its shell answers), and the destination
holds nothing and says why."""

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


def test_a_vm_the_destination_cannot_record_stays_running_at_the_source_and_the_error_is_reported(
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
                out = a.vm(
                    "migrate",
                    "vm1",
                    "--to",
                    b.address,
                    "--token-file",
                    str(b.token_file),
                    check=False,
                )
                # the arrival is recorded at PREPARE, before the source pauses: the failure is
                # known there and the source never stopped
                assert "failed during prepare" in out, out
                # (the destination's ABORT may be lost to its reset: its record says why)
                assert "the VM keeps running here" in out, out
                recs = b.client.request("GET", "/api/migrations")["migrations"]
                assert recs[-1]["state"] == "failed", recs
                assert "its owner could not record it" in recs[-1]["error"], recs
                assert a.state_of("vm1") == "running"
                assert "visible" in a.shell("vm1", "mem", b"visible")
                for _ in range(200):
                    if not b.names() and b.free() == free_b:
                        break
                    time.sleep(0.05)
                assert b.names() == [] and b.free() == free_b
                assert not (state_b / "vms" / "vm1.json").exists()
                assert not list((state_b / "run").glob("vm1.*"))
            finally:
                b.close()
        finally:
            a.close()
    finally:
        subprocess.run(["umount", "-l", str(state_b)], check=False)
