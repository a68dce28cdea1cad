"""Synthetic storage with real guests: the worker offers the page file's disk on VMBus; a
hostile test guest's bad requests are each refused with an error status and counted while its
good ones reach the host file; the reference guest's storage VSC writes and reads the disk."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.worker import VirtualMachine, VmConfig
from tests.guests.build import build_test_guest

pytestmark = pytest.mark.guest

MiB = 1 << 20


def test_hostile_storage_requests_are_each_refused_with_an_error_status_and_the_vm_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    elf = build_test_guest("storage_hostile", tmp_path)
    disk = tmp_path / "vm.pagefile"
    cfg = VmConfig.create(
        image=elf,
        memory="64M",
        dynamic_memory=True,
        page_file_size="1M",
        page_file=disk,
    )
    with VirtualMachine(cfg) as vm:
        vm.start()
        end = vm.wait(120)
        assert end is not None and end.reason == "poweroff", end
        assert end.status == 42, f"the hostile storage guest stopped at step {end.status}"
        assert b"still standing" in vm.serial.read_until(b"still standing\n", 5)
        assert vm.storage is not None
        c = vm.storage.status()["counters"]
    assert c["refused"] == 5
    for kind in ("unknown_operation", "lba_out_of_range", "bad_buffer", "too_large"):
        assert c[kind] == 1, kind
    assert c["invalid_request"] == 1
    assert (c["writes"], c["reads"]) == (1, 1)
    assert sum("refused" in r.getMessage() for r in caplog.records) >= 5
    # the good WRITE put guest page 0x500000 at LBA 8 of the host file
    assert disk.read_bytes()[8 * 512 : 8 * 512 + 4096] == bytes.fromhex("785634125a5a5a5a") * 512
