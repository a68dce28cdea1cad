"""Fuzz target of the synthetic devices' guest-visible port handlers: the 16550A UART (every
register, both access sizes, the host feeding input) and the power-off port, driven by a
program of port accesses; the UART's saved state then restored into a fresh chip."""

from __future__ import annotations

import struct

from pyhv.devices.poweroff import PowerOff
from pyhv.devices.uart16550 import Uart16550, UartState
from tests.support.fuzz import Reader, Target, blob

OUT, IN, FEED, POWEROFF = range(4)


def drive(data: bytes) -> None:
    out: list[bytes] = []
    uart = Uart16550(out.append, lambda: None)
    off: list[int] = []
    power = PowerOff(off.append)
    r = Reader(data)
    steps = 0
    while r.left and steps < 256:
        steps += 1
        op = r.u8() % 4
        if op == OUT:
            uart.io_write(r.u8() % 10, (1, 2, 4)[r.u8() % 3], r.u32())
        elif op == IN:
            size = (1, 2, 4)[r.u8() % 3]
            value = uart.io_read(r.u8() % 10, size)
            assert 0 <= value < 1 << (8 * size)
        elif op == FEED:
            uart.feed(r.blob())
        elif op == POWEROFF:
            size = r.u8() % 6
            power.io_write(size, r.u32())
            assert 0 <= power.io_read(size) <= 0xFFFFFFFF
    assert sum(map(len, out)) <= steps * 4, "more output than the guest wrote"
    saved = uart.save()
    again = Uart16550(lambda b: None)
    again.restore(UartState.from_wire(saved.to_wire()))
    assert again.save() == saved


def _out(reg: int, value: int) -> bytes:
    return bytes([OUT, reg, 0]) + struct.pack("<I", value)


def seeds() -> list[bytes]:
    setup = b"".join(
        _out(r, v) for r, v in [(3, 0x83), (0, 0x0C), (1, 0), (3, 0x03), (2, 0xC7), (1, 0x01)]
    )
    return [
        setup + bytes([FEED]) + blob(b"hello, world, more than sixteen bytes") + bytes([IN, 0, 0]) * 20,
        setup + _out(4, 0x10) + b"".join(_out(0, c) for c in b"loop") + bytes([IN, 0, 5, IN, 0, 2]),
        setup + b"".join(_out(0, c) for c in b"login: ") + bytes([POWEROFF, 1]) + struct.pack("<I", 0),
    ]  # fmt: skip


UART = Target(
    "devices.ports",
    "synthetic devices' port handlers: 16550A UART and power-off (pyhv.devices)",
    seeds,
    drive,
    (),
    max_size=4096,
    kind="simulation",
)

TARGETS = [UART]
