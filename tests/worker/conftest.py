"""Tiny test guests (tests/worker/guests/*.S), assembled with the machine's gcc into ELF
images that follow docs/boot-protocol.md."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

GUESTS = Path(__file__).parent / "guests"


@pytest.fixture(scope="session")
def test_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is not installed: it assembles the test guests")
    out = tmp_path_factory.mktemp("guests")

    def build(name: str) -> Path:
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

    return build
