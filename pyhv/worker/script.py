"""Drive the guest's shell from a script: wait for the prompt, type one line, repeat; then
wait for the VM to end (a script normally ends with `poweroff`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from pyhv.worker.console import ConsoleClosed, SerialLog
from pyhv.worker.outcome import VmEnd

PROMPT = b"pyhv> "
ENTER = b"\r"  # what a terminal's Enter key sends


class ScriptError(RuntimeError):
    """The guest did not answer the script as expected (no prompt in time)."""


class Machine(Protocol):
    serial: SerialLog

    def send(self, data: bytes) -> None: ...
    def stop(self, why: str = ...) -> None: ...
    def wait(self, timeout: float | None = None) -> VmEnd | None: ...


def script_lines(text: str) -> list[str]:
    """The commands of a script: one per line; blank lines and `#` comments are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def run_script(
    vm: Machine,
    commands: Iterable[str],
    *,
    timeout: float = 120.0,
    before: Callable[[str], None] | None = None,
) -> VmEnd:
    """Type each command after the prompt; returns how the VM ended. If the script does not
    power the guest off, the VM is stopped once the last command has finished. ``before`` is
    called with each command once its prompt has appeared (an empty command is an Enter)."""
    for command in commands:
        if "\r" in command or "\n" in command:
            raise ValueError(f"command {command!r} spans lines: give one command per line")
        try:
            vm.serial.read_until(PROMPT, timeout)
        except ConsoleClosed:
            break  # the VM ended (e.g. a fault) before this command
        except TimeoutError as e:
            vm.stop("the script timed out")
            raise ScriptError(f"no shell prompt before {command!r}: {e}") from None
        if before is not None:
            before(command)
        vm.send(command.encode() + ENTER)
    end = vm.wait(0)
    if end is None:
        try:
            vm.serial.read_until(PROMPT, timeout)
            vm.stop("the script ended without poweroff")
        except ConsoleClosed:
            pass
        except TimeoutError as e:
            vm.stop("the script timed out")
            raise ScriptError(f"the last command did not finish: {e}") from None
    end = vm.wait(timeout)
    if end is None:
        vm.stop("did not end after the script")
        end = vm.wait(10)
    assert end is not None
    return end
