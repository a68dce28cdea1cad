"""Tiny test guests (tests/worker/guests/*.S), assembled with the machine's gcc into ELF
images that follow docs/boot-protocol.md."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"


def build_test_guest(name: str, out: Path, sources: Path = GUESTS) -> Path:
    """Assemble `sources/name.S` into `out/name.elf`, linked at 1 MiB like the real guest."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail(
            "gcc is not installed: pyhv needs it to assemble the test guests (apt-get install gcc)"
        )
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
                str(sources / f"{name}.S"),
            ],
            check=True,
        )
    return elf
