"""The first keys typed to a freshly booted guest reach its shell: bytes sent the moment the
first prompt appears, or even before the guest has set up its serial port (they wait in the
UART as on a serial line), are all echoed and the command runs."""

from __future__ import annotations

import pytest

from pyhv.guest_image import image_path
from pyhv.worker import VirtualMachine, VmConfig
from pyhv.worker.script import ENTER, PROMPT

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def guest_image() -> str:
    return str(image_path())


def _ran_ticks(out: str) -> None:
    assert "unknown command" not in out, out
    assert "ticks: " in out, out


def test_a_command_typed_as_soon_as_the_first_prompt_appears_is_echoed_whole_and_runs(
    guest_image: str,
) -> None:
    with VirtualMachine(VmConfig.create(image=guest_image, memory="256M")) as vm:
        vm.start()
        vm.serial.read_until(PROMPT, 60)
        vm.send(b"ticks" + ENTER)
        out = vm.serial.read_until(PROMPT, 60).decode()
    assert out.startswith("ticks\r\n"), out
    _ran_ticks(out)


def test_keys_typed_before_the_guest_sets_up_its_serial_port_wait_for_its_shell(
    guest_image: str,
) -> None:
    with VirtualMachine(VmConfig.create(image=guest_image, memory="256M")) as vm:
        vm.send(b"ticks" + ENTER)  # on the line before the guest's first instruction
        vm.start()
        banner = vm.serial.read_until(PROMPT, 60).decode()
        out = vm.serial.read_until(PROMPT, 60).decode()
    assert "pyhv guest:" in banner, banner
    assert out.startswith("ticks\r\n"), out
    _ran_ticks(out)
