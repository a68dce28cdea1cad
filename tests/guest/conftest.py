"""Fixtures for the reference guest's tests: the built image, and a booted guest to type at."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyhv.guest_image import image_path

PROMPT = b"pyhv> "
TIMEOUT = 30.0


@pytest.fixture(scope="session")
def guest_image() -> Path:
    return image_path()


class Shell:
    """A booted reference guest, driven through its serial console."""

    def __init__(self, vm) -> None:  # type: ignore[no-untyped-def]
        self.vm = vm
        self.banner = vm.serial.read_until(PROMPT, TIMEOUT).decode()

    def run(self, line: str) -> str:
        """Type a command; returns its output (without the echo and the next prompt)."""
        self.vm.send(line.encode() + b"\r")
        out = self.vm.serial.read_until(PROMPT, TIMEOUT).decode().replace("\r", "")
        out = out[: -len(PROMPT)]
        first, _, rest = out.partition("\n")
        return rest

    def values(self, line: str) -> dict[str, int]:
        """`name: N ...` lines of a command's output as {name: N}."""
        return {m[1]: int(m[2]) for m in re.finditer(r"^([\w-]+): (\d+)", self.run(line), re.M)}


@pytest.fixture
def boot_guest(guest_image: Path) -> Iterator[Callable[..., Shell]]:
    from pyhv.worker import VirtualMachine, VmConfig

    vms = []

    def boot(memory: str = "256M") -> Shell:
        vm = VirtualMachine(VmConfig.create(image=guest_image, memory=memory))
        vms.append(vm)
        vm.start()
        return Shell(vm)

    yield boot
    for vm in vms:
        vm.close()
