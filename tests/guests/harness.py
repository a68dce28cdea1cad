"""A partition with one VP in long mode running a test guest, in a few lines per test."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pyhv.hypervisor import Partition, VirtualProcessor, VpEvent, enter_long_mode
from tests.guests.build import GuestImage, build_guest

RAM = 16 << 20
STACK_TOP = 0x1FF000
POWER_OFF_PORT = 0xF4  # as in docs/boot-protocol.md


@contextmanager
def guest(
    name: str,
    ram: int = RAM,
    cpl: int = 0,
    rflags: int = 0x2,
    source: str | None = None,
    partition_name: str | None = None,
    irqchip: bool = True,
    **gprs: int,
) -> Iterator[tuple[Partition, VirtualProcessor, GuestImage]]:
    """Partition with `ram` bytes at GPA 0, the guest loaded at 2 MiB and VP 0 set to enter it."""
    img = build_guest(name, source=source)
    with Partition(partition_name or name, irqchip=irqchip) as p:
        p.add_memory(0, ram)
        p.write(img.base, img.code)
        vp = p.create_vp(0)
        enter_long_mode(p, vp, img.entry, STACK_TOP, cpl=cpl, rflags=rflags, **gprs)
        yield p, vp, img


def run_until_power_off(p: Partition, vp: VirtualProcessor, timeout: float = 10.0) -> int:
    """Start the VP and wait until the guest writes to the power-off port; returns the value."""
    box: list[int] = []

    def power_off(msg):  # type: ignore[no-untyped-def]
        box.append(msg.value)
        vp.pause()

    handle = p.intercepts.install_io(POWER_OFF_PORT, POWER_OFF_PORT, power_off, read=False)
    try:
        vp.start()
        deadline_event = _wait_paused(vp, timeout)
        if not box:
            raise AssertionError(f"guest did not power off within {timeout} s: {deadline_event}")
        return box[0]
    finally:
        handle.uninstall()


def _wait_paused(vp: VirtualProcessor, timeout: float) -> VpEvent | str:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if vp.state.value == "paused":
            return "paused"
        ev = vp.wait(0.01)
        if ev is not None:
            return ev
    return "timeout"
