"""Fixtures for the reference guest's tests: the built image, and a booted guest to type at."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyhv.guest_image import image_path
from tests.guest.shell import Shell


@pytest.fixture(scope="session")
def guest_image() -> Path:
    return image_path()


@pytest.fixture
def boot_guest(guest_image: Path) -> Iterator[Callable[..., Shell]]:
    """Boot the guest under the worker (closed at the end of the test); returns its shell."""
    from pyhv.worker import VirtualMachine, VmConfig

    vms = []

    def boot(memory: str = "256M", **config: object) -> Shell:
        vm = VirtualMachine(VmConfig.create(image=guest_image, memory=memory, **config))
        vms.append(vm)
        vm.start()
        return Shell(vm)

    yield boot
    for vm in vms:
        vm.close()
