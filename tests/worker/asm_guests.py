"""Tiny test guests (tests/worker/guests/*.S), assembled with the machine's gcc into ELF
images that follow docs/boot-protocol.md."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"


def build_test_guest(name: str, out: Path) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: it assembles the test guests")
    elf = out / f"{name}.elf"
    if not elf.exists():
        subprocess.run(
            [
                gcc,
                "-nostdlib",
                "-static",
                "-no-pie",
                f"-Wl,-T,{GUESTS / 'link.ld'}",
                "-Wl,--build-id=none",
                "-Wl,-z,noexecstack",
                "-o",
                str(elf),
                str(GUESTS / f"{name}.S"),
            ],
            check=True,
        )
    return elf
