"""The script driver types each command only after the shell's prompt, and a guest that stops
answering ends the session with a clear error instead of hanging."""

from __future__ import annotations

import threading

import pytest

from pyhv.worker.console import ConsoleClosed, SerialLog
from pyhv.worker.outcome import VmEnd
from pyhv.worker.script import ScriptError, run_script, script_lines

pytestmark = pytest.mark.simulation


class FakeShell:
    """A VM whose guest runs a shell that echoes, answers `echo X`, and powers off."""

    def __init__(self, answer: bool = True) -> None:
        self.serial = SerialLog()
        self.typed: list[bytes] = []
        self.answer = answer
        self._end: VmEnd | None = None
        self._ended = threading.Event()
        self.serial.append(b"banner\r\npyhv> ")

    def send(self, data: bytes) -> None:
        assert self.serial.text.endswith("pyhv> "), "typed before the prompt"
        self.typed.append(data)
        line = data.decode().rstrip("\r")
        if not self.answer:
            return
        self.serial.append(line.encode() + b"\r\n")
        if line.startswith("poweroff"):
            self.stop_with(VmEnd("poweroff", status=int(line.split()[1]) if " " in line else 0))
            return
        if line.startswith("echo "):
            self.serial.append(line[5:].encode() + b"\r\n")
        self.serial.append(b"pyhv> ")

    def stop_with(self, end: VmEnd) -> None:
        if self._end is None:
            self._end = end
        self.serial.close()
        self._ended.set()

    def stop(self, why: str = "") -> None:
        self.stop_with(VmEnd("stopped", detail=why))

    def wait(self, timeout: float | None = None) -> VmEnd | None:
        return self._end if self._ended.wait(timeout) else None


def test_each_command_is_typed_after_a_prompt_and_the_poweroff_status_is_returned() -> None:
    vm = FakeShell()
    end = run_script(vm, ["echo one", "echo two", "poweroff 4"], timeout=5)
    assert vm.typed == [b"echo one\r", b"echo two\r", b"poweroff 4\r"]
    assert end.reason == "poweroff" and end.status == 4
    assert "one\r\npyhv> echo two" in vm.serial.text


def test_a_script_without_poweroff_stops_the_vm_after_the_last_command() -> None:
    vm = FakeShell()
    end = run_script(vm, ["echo x"], timeout=5)
    assert end.reason == "stopped" and "without poweroff" in end.detail


def test_a_guest_that_stops_answering_ends_the_script_with_an_error() -> None:
    vm = FakeShell(answer=False)
    with pytest.raises(ScriptError, match="no shell prompt before 'echo b'"):
        run_script(vm, ["echo a", "echo b"], timeout=0.2)
    end = vm.wait(0)
    assert end is not None and end.reason == "stopped"


def test_script_files_skip_blank_lines_and_comments() -> None:
    assert script_lines("# setup\n\n  mem  \nticks\n# done\n") == ["mem", "ticks"]


def test_a_command_cannot_smuggle_a_second_line() -> None:
    with pytest.raises(ValueError, match="spans lines"):
        run_script(FakeShell(), ["mem\rpoweroff"], timeout=1)


def test_waiting_for_output_from_a_vm_that_ended_says_so() -> None:
    log = SerialLog()
    log.append(b"partial")
    log.close()
    with pytest.raises(ConsoleClosed, match="ended before"):
        log.read_until(b"pyhv> ", 5)
