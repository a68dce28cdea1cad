"""Typing at a booted reference guest's shell over its serial console."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyhv.worker import VirtualMachine

PROMPT = b"pyhv> "
TIMEOUT = 30.0


class Shell:
    """A booted reference guest, driven through its serial console."""

    def __init__(self, vm: VirtualMachine) -> None:
        self.vm = vm
        self.banner = vm.serial.read_until(PROMPT, TIMEOUT).decode()

    def run(self, line: str) -> str:
        """Type a command; returns its output (without the echo and the next prompt)."""
        self.vm.send(line.encode() + b"\r")
        out = self.vm.serial.read_until(PROMPT, TIMEOUT).decode().replace("\r", "")
        out = out[: -len(PROMPT)]
        _echo, _, rest = out.partition("\n")
        return rest

    def values(self, line: str) -> dict[str, int]:
        """`name: N ...` lines of a command's output as {name: N}."""
        return {m[1]: int(m[2]) for m in re.finditer(r"^([\w-]+): (\d+)", self.run(line), re.M)}
