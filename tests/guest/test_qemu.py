"""The same image boots in QEMU's microvm under KVM through the Xen PVH note (`-M microvm
-kernel`), answers on its serial console and powers QEMU off through isa-debug-exit. QEMU runs
`-accel kvm` (never its emulator) with `-cpu host,-arch-capabilities`, which starts on Intel and
AMD hosts (plain `-cpu host` aborts on AMD: "failed to set MSR 0x10a")."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.kinds import qemu_guest_ran

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.guest


def read_until(
    proc: subprocess.Popen[bytes], marker: bytes, out: bytearray, timeout: float = 60
) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while marker not in out:
        left = deadline - time.monotonic()
        assert left > 0, f"{marker!r} did not come from QEMU; output: {bytes(out)!r}"
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"QEMU ended early; output: {bytes(out)!r}"
            out.extend(chunk)


def test_qemu_microvm_boots_the_image_through_its_pvh_note(guest_image: Path) -> None:
    assert QEMU is not None, "qemu-system-x86_64 is missing: apt-get install -y qemu-system-x86"
    cmd = [
        QEMU, "-M", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off",
        # KVM only, never the emulator; -cpu host aborts QEMU 7.2 on AMD (MSR 0x10a)
        "-accel", "kvm", "-cpu", "host,-arch-capabilities",
        "-m", "128M", "-kernel", str(guest_image),
        "-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None
    out = bytearray()
    try:
        read_until(proc, b"pyhv> ", out)
        assert out.startswith(b"pyhv guest: 127 MiB RAM")
        qemu_guest_ran(proc.pid, bytes(out))
        proc.stdin.write(b"mem\r")
        proc.stdin.flush()
        read_until(proc, b"hot-added: 0 MiB", out)  # receive interrupts work through the IOAPIC
        proc.stdin.write(b"poweroff 3\r")
        proc.stdin.flush()
        assert proc.wait(60) == 3 << 1 | 1  # isa-debug-exit reports (value << 1) | 1
    finally:
        proc.kill()
        proc.wait()
