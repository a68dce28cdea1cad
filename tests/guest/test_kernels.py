"""`pyhv run --kernel` boots kernels written to the published entry protocols alone: a Xen PVH
ELF and a Multiboot v1 kernel (as ELF and as flat image with address fields). Each prints on
COM1 the command line and the RAM of the memory map its loader gave it, then powers off; an
image in no format pyhv knows, or a malformed one, is refused with one line and status 1."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.guest.kernels import CMDLINE, KERNELS, expected_cmdline, kernel, ram_mib
from tests.support.wait import wait_for
from tests.vmms.vmms_process import VmmsProcess, vmms_host

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def host(tmp_path: Path) -> Iterator[VmmsProcess]:
    with vmms_host(tmp_path) as h:
        yield h


def pyhv_run(image: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyhv.cli", "run", "--kernel", str(image), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("name", list(KERNELS))
def test_a_kernel_of_a_published_protocol_boots_under_pyhv_run_and_reads_its_boot_info(
    name: str,
) -> None:
    path = kernel(name)
    r = pyhv_run(path, "--memory", "96M", "--cmdline", CMDLINE)
    prefix = KERNELS[name][2]
    lines = r.stdout.splitlines()
    assert r.returncode == 0, f"status {r.returncode}; out {r.stdout!r} err {r.stderr!r}"
    assert f"{prefix}: cmdline: {expected_cmdline(name, path)}" in lines, lines
    assert ram_mib(lines, prefix) == 96  # the whole of --memory, from the memory map
    if prefix == "multiboot":
        assert "multiboot: mem_upper 97280 KiB" in lines  # 96 MiB less the first MiB
    assert "guest powered off with status 0" in r.stderr


HOSTILE = {
    "random.bin": (lambda k: bytes(range(256)) * 16, "random.bin is in no format pyhv boots"),
    "truncated.elf": (lambda k: k("pvh").read_bytes()[:300], "truncated.elf is truncated"),
    "bad-checksum.elf": (
        lambda k: (
            k("multiboot-elf")
            .read_bytes()
            .replace(struct.pack("<II", 0x1BADB002, 3), struct.pack("<II", 0x1BADB002, 1))
        ),
        "bad-checksum.elf has a Multiboot header at offset 0x1000 with a bad checksum",
    ),
    "pvh-entry-outside.elf": (
        lambda k: _retarget_pvh_entry(k("pvh").read_bytes(), 0x5000000),
        "entry point 0x5000000 is outside its loaded segments",
    ),
}


def _retarget_pvh_entry(data: bytes, entry: int) -> bytes:
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0"
    at = data.index(note) + len(note)
    return data[:at] + struct.pack("<I", entry) + data[at + 4 :]


@pytest.mark.kvm  # the partition is created, then the image refused: no guest code runs
@pytest.mark.parametrize("file", list(HOSTILE))
def test_an_image_pyhv_cannot_boot_is_refused_with_one_line_and_status_1(
    file: str, tmp_path: Path
) -> None:
    make, message = HOSTILE[file]
    bad = tmp_path / file
    bad.write_bytes(make(kernel))
    r = pyhv_run(bad, "--memory", "96M")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_vmms_vm_whose_image_is_a_pvh_kernel_boots_it_and_a_bad_one_is_reported(
    request: pytest.FixtureRequest,
) -> None:
    vmms: VmmsProcess = request.getfixturevalue("host")
    # A VM's image is a name in the VMMS's images directory (docs/security.md).
    images = vmms.state / "images"
    images.mkdir(exist_ok=True)
    shutil.copyfile(kernel("pvh"), images / "pvh-kernel")
    shutil.copyfile(__file__, images / "test_kernels.py")
    vmms.vm("create", "pvh", "--memory", "64M", "--kernel", "pvh-kernel", "--cmdline", CMDLINE)
    vmms.vm("start", "pvh")
    vmms.vm("create", "bad", "--memory", "64M", "--kernel", "test_kernels.py")
    vmms.vm("start", "bad")

    def ended() -> dict[str, dict] | None:  # type: ignore[type-arg]
        shown = {n: vmms.show(n) for n in ("pvh", "bad")}
        return shown if all(s["state"] != "running" for s in shown.values()) else None

    shown = wait_for(ended, 60, "both VMs ended", interval=0.1)
    # status 0: the kernel found the PVH magic and reached its power-off write
    assert shown["pvh"]["state"] == "off", shown["pvh"]
    assert "guest powered off with status 0" in vmms.vm("show", "pvh")
    assert shown["bad"]["state"] == "crashed", shown["bad"]
    assert "test_kernels.py is in no format pyhv boots" in vmms.vm("show", "bad")
