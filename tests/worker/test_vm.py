"""The worker boots a guest by direct boot, emulates its devices and reports how it ended."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pyhv.worker import VirtualMachine, VmConfig, WorkerProcess
from pyhv.worker.boot import ImageError

pytestmark = pytest.mark.guest

Build = Callable[[str], Path]


def boot(image: Path, memory: str = "32M") -> VirtualMachine:
    vm = VirtualMachine(VmConfig.create(image=image, memory=memory))
    vm.start()
    return vm


def test_a_guest_prints_on_com1_and_powers_off_with_its_status(test_guest: Build) -> None:
    with boot(test_guest("hello")) as vm:
        end = vm.wait(30)
    assert end is not None and end.reason == "poweroff" and end.status == 7
    assert end.exit_code == 7
    assert vm.serial.text == "hello from the test guest\n"


def test_a_guest_that_triple_faults_is_reported_with_its_registers(test_guest: Build) -> None:
    with boot(test_guest("triple_fault_gp")) as vm:
        end = vm.wait(30)
    assert end is not None and end.reason == "triple_fault" and end.failed
    assert end.registers["rbx"] == 0x7E57FA17  # the marker the guest loaded
    assert end.registers["rax"] == 0x8000_0000_0000_0000  # the non-canonical address
    assert end.registers["cr3"] == 0x10000
    text = end.describe()
    assert "triple-faulted on VP 0" in text and "RBX=000000007e57fa17" in text
    assert end.exit_code != 0


def test_a_guest_writing_garbage_to_the_uart_does_not_disturb_the_worker(test_guest: Build) -> None:
    with boot(test_guest("uart_garbage")) as vm:
        end = vm.wait(60)
    assert end is not None and end.reason == "poweroff" and end.status == 0
    assert vm.serial.text.endswith("\nstill talking\n")


def test_the_owner_stops_a_running_vm(test_guest: Build) -> None:
    with boot(test_guest("halt_loop")) as vm:
        vm.serial.read_until(b"idle\n", 30)
        assert vm.wait(0) is None  # it runs: it has not ended
        vm.stop("test is done")
        end = vm.wait(10)
    assert end is not None and end.reason == "stopped" and end.exit_code == 0
    assert "test is done" in end.describe()


@pytest.mark.kvm
def test_an_image_larger_than_guest_ram_is_refused_with_a_clear_error(
    test_guest: Build, tmp_path: Path
) -> None:
    from tests.support.elf import make_elf

    big = tmp_path / "big.elf"
    big.write_bytes(make_elf([(0x100000, b"\xf4", 64 << 20, 5)], entry=0x100000))
    vm = VirtualMachine(VmConfig.create(image=big, memory="32M"))
    with pytest.raises(ImageError, match="outside guest RAM"):
        vm.start()


def test_a_worker_process_runs_the_vm_and_reports_how_it_ended(test_guest: Build) -> None:
    got = bytearray()
    with WorkerProcess(VmConfig.create(image=test_guest("hello"), memory="32M"), got.extend) as w:
        w.start()
        end = w.wait(60)
        pid = w.pid
    assert end is not None and end.reason == "poweroff" and end.status == 7
    assert bytes(got) == b"hello from the test guest\n"
    assert pid is not None and w.returncode == 0


def test_a_worker_process_stops_its_vm_when_asked(test_guest: Build) -> None:
    with WorkerProcess(VmConfig.create(image=test_guest("halt_loop"), memory="32M")) as w:
        w.start()
        w.serial.read_until(b"idle\n", 60)
        w.send(b"ignored input")
        w.stop()
        end = w.wait(30)
    assert end is not None and end.reason == "stopped"


def test_code_that_kvm_cannot_run_is_reported_as_an_emulation_error(test_guest: Build) -> None:
    with boot(test_guest("fetch_mmio")) as vm:
        end = vm.wait(30)
    assert end is not None and end.reason == "emulation_error", end
    assert end.registers["rbx"] == 0x5EED
    assert "KVM could not run VP 0" in end.describe() and end.exit_code == 4


def test_a_worker_process_that_dies_is_reported_and_harms_no_one_else(test_guest: Build) -> None:
    import os
    import signal

    with WorkerProcess(VmConfig.create(image=test_guest("halt_loop"), memory="32M")) as w:
        w.start()
        w.serial.read_until(b"idle\n", 60)
        assert w.pid is not None
        os.kill(w.pid, signal.SIGKILL)
        end = w.wait(30)
    assert end is not None and end.reason == "worker_error"
    assert "exited (code -9) without a report" in end.detail


def test_string_port_io_moves_whole_buffers_through_the_uart(test_guest: Build) -> None:
    with boot(test_guest("rep_string_io")) as vm:
        vm.serial.read_until(b"rep outsb works\n", 30)
        vm.send(b"Zing")
        end = vm.wait(30)
    assert end is not None and end.reason == "poweroff" and end.status == ord("Z")
    assert vm.serial.text == "rep outsb works\nZing"
