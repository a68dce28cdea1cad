"""The reference guest's shell over the emulated serial port, with each command's effect
checked from the outside (the shell's own counters and the host's memory)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from pyhv.guest_image import image_path
from pyhv.worker import VirtualMachine, VmConfig
from pyhv.worker.script import ENTER, PROMPT
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MIB = 1 << 20


@pytest.fixture(scope="module")
def guest_image() -> str:
    return str(image_path())


@pytest.fixture
def vm(guest_image: str) -> Iterator[VirtualMachine]:
    machine = VirtualMachine(VmConfig.create(image=guest_image, memory="512M"))
    machine.start()
    machine.serial.read_until(PROMPT, 60)
    yield machine
    machine.close()


def shell(vm: VirtualMachine, command: str, timeout: float = 60) -> str:
    """Type a command, return its output (up to the next prompt)."""
    vm.send(command.encode() + ENTER)
    out = vm.serial.read_until(PROMPT, timeout).decode()
    assert out.startswith(command), out
    return out[len(command) : -len(PROMPT)].replace("\r\n", "\n").strip("\n")


def counters(vm: VirtualMachine) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^([a-z-]+): (\d+) MiB$", shell(vm, "mem"), re.M)}


def test_the_guest_boots_to_its_shell_prompt_and_names_its_ram(guest_image: str) -> None:
    with VirtualMachine(VmConfig.create(image=guest_image, memory="256M")) as vm:
        vm.start()
        banner = vm.serial.read_until(PROMPT, 60).decode()
    assert "256 MiB RAM" in banner


def test_ram_beyond_3_gib_continues_above_the_apic_hole_and_the_guest_sees_all_of_it(
    guest_image: str,
) -> None:
    with VirtualMachine(VmConfig.create(image=guest_image, memory="5G")) as vm:
        vm.start()
        vm.serial.read_until(PROMPT, 60)
        assert [(r.gpa, r.size) for r in vm.partition.regions] == [  # type: ignore[union-attr]
            (0, 3 << 30),
            (4 << 30, 2 << 30),
        ]
        assert counters(vm)["visible"] == 5 * 1024


def test_mem_shows_the_ram_the_worker_gave_the_guest(vm: VirtualMachine) -> None:
    c = counters(vm)
    assert c["visible"] == 512
    assert c["free"] + c["committed"] <= 512
    assert c["ballooned"] == 0 and c["hot-added"] == 0


def test_testlimit_commits_guest_memory_and_host_memory_follows_then_kill_releases_it(
    vm: VirtualMachine,
) -> None:
    before = counters(vm)
    host_before = vm.host_resident_bytes()
    out = shell(vm, "testlimit -m 256 -c 1")
    assert "committed 256 MiB" in out
    during = counters(vm)
    assert during["committed"] - before["committed"] == 256
    # The task touches its pages in the background (at CPL3): the host's memory grows with it.
    assert wait_for(
        lambda: vm.host_resident_bytes() - host_before >= 240 * MIB,
        60,
        "vm.host_resident_bytes() - host_before >= 240 * MIB",
    )
    grown = vm.host_resident_bytes() - host_before
    assert grown <= 300 * MIB
    assert "released" in shell(vm, "kill")
    after = counters(vm)
    assert after["committed"] == before["committed"]
    assert after["free"] == before["free"]


def test_ticks_count_the_guests_timer_interrupts(vm: VirtualMachine) -> None:
    first = int(shell(vm, "ticks").split()[-1])
    assert wait_for(
        lambda: int(shell(vm, "ticks").split()[-1]) > first,
        10,
        'int(shell(vm, "ticks").split()[-1]) > first',
    )


def test_a_mistyped_command_is_answered_and_the_shell_goes_on(vm: VirtualMachine) -> None:
    assert "unknown command 'memm'" in shell(vm, "memm")
    assert "usage" in shell(vm, "testlimit -x")
    assert counters(vm)["visible"] == 512


def test_poweroff_ends_the_vm_with_exit_status_0(vm: VirtualMachine) -> None:
    vm.send(b"poweroff" + ENTER)
    end = vm.wait(60)
    assert end is not None and end.reason == "poweroff" and end.status == 0
    assert end.exit_code == 0


def test_poweroff_passes_the_guests_exit_code_through(vm: VirtualMachine) -> None:
    vm.send(b"poweroff 42" + ENTER)
    end = vm.wait(60)
    assert end is not None and end.status == 42 and end.exit_code == 42
