"""A cross-check that the test kernels follow the published protocols, not pyhv's reading of
them: QEMU (`-kernel`, under KVM, never its emulator) boots the same PVH and Multiboot kernels
on its microvm and pc machines, and they print the same lines as under `pyhv run --kernel`
(the RAM figures aside: QEMU's memory map keeps holes and firmware areas)."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.guest.kernels import CMDLINE, KERNELS, expected_cmdline, kernel, ram_mib, shape

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]
KVM_DEBUGFS = Path("/sys/kernel/debug/kvm")
MACHINES = {
    "microvm": "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off",
    "pc": "pc",
}


def _guest_ran(pid: int, output: bytes) -> None:
    """QEMU's guest ran under KVM: KVM's debugfs lists a VM of that process."""
    try:
        from tests.kinds import qemu_guest_ran  # type: ignore[import-not-found]
    except ImportError:  # the suite's kind checker is not here yet: check debugfs ourselves
        assert KVM_DEBUGFS.is_dir(), "mount debugfs: mount -t debugfs none /sys/kernel/debug"
        assert list(KVM_DEBUGFS.glob(f"{pid}-*")), f"QEMU (pid {pid}) runs no KVM VM"
        return
    qemu_guest_ran(pid, output)


def qemu_lines(machine: str, image: Path, last: str, timeout: float = 60) -> list[str]:
    """Boot `image` in QEMU and read its serial lines up to the line starting with `last`.
    No isa-debug-exit: the kernel's power-off write goes nowhere and it halts, so QEMU stays
    up for the KVM check and is then killed."""
    qemu = shutil.which("qemu-system-x86_64")
    assert qemu, "qemu-system-x86_64 is missing: apt-get install qemu-system-x86"
    cmd = [
        qemu, "-M", MACHINES[machine], "-accel", "kvm", "-cpu", "host,-arch-capabilities",
        "-m", "128M", "-kernel", str(image), "-append", CMDLINE,
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout is not None
    out = bytearray()
    try:
        deadline = time.monotonic() + timeout
        while not any(x.startswith(last.encode()) for x in out.split(b"\r\n")[:-1]):
            left = deadline - time.monotonic()
            assert left > 0, f"{last!r} did not come from QEMU; output: {bytes(out)!r}"
            if select.select([proc.stdout], [], [], left)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"QEMU ended early ({proc.wait()}); output: {bytes(out)!r}"
                out.extend(chunk)
        _guest_ran(proc.pid, bytes(out))
    finally:
        proc.kill()
        proc.wait()
    return out.decode().replace("\r", "").splitlines()


def pyhv_lines(image: Path) -> list[str]:
    r = subprocess.run(
        [sys.executable, "-m", "pyhv.cli", "run", "--kernel", str(image), "--memory", "128M",
         "--cmdline", CMDLINE],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr)
    return r.stdout.splitlines()


@pytest.mark.parametrize("machine", list(MACHINES))
@pytest.mark.parametrize("name", list(KERNELS))
def test_qemu_boots_the_test_kernels_and_they_print_what_they_print_under_pyhv(
    name: str, machine: str
) -> None:
    image = kernel(name)
    prefix = KERNELS[name][2]
    ours = pyhv_lines(image)
    theirs = qemu_lines(machine, image, f"{prefix}: RAM ")
    assert f"{prefix}: cmdline: {expected_cmdline(name, image)}" in theirs, theirs
    assert shape(theirs) == shape(ours)
    assert 120 <= ram_mib(theirs, prefix) <= 128  # 128M less QEMU's holes and firmware areas
