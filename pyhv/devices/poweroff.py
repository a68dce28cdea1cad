"""The power-off port (0xF4, QEMU's ``isa-debug-exit`` address): a guest write powers the VM
off with the written value as its exit status. Reads return all ones (nothing is there)."""

from __future__ import annotations

from collections.abc import Callable

POWEROFF_PORT = 0xF4


class PowerOff:
    def __init__(self, on_poweroff: Callable[[int], None]) -> None:
        self._on_poweroff = on_poweroff
        self.status: int | None = None

    def io_write(self, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            return
        status = value & ((1 << (8 * size)) - 1)
        if self.status is None:
            self.status = status
            self._on_poweroff(status)

    def io_read(self, size: int) -> int:
        return (1 << (8 * min(max(size, 1), 4))) - 1
