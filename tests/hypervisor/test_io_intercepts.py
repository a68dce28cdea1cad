"""I/O port intercepts: the handler's value reaches the guest, the guest's writes reach the handler."""

from __future__ import annotations

import pytest

from tests.guests.harness import guest, run_until_power_off

pytestmark = pytest.mark.kvm


def test_an_in_instruction_receives_the_value_the_handler_returns_for_sizes_1_2_4() -> None:
    with guest("io_echo") as (p, vp, _):
        reads = iter([0xAB, 0xBEEF, 0xDEADBEEF])
        echoed: list[tuple[int, int]] = []
        p.intercepts.install_io(0x10, 0x10, lambda m: next(reads), write=False)
        p.intercepts.install_io(0x11, 0x12, lambda m: echoed.append((m.access_size, m.value)), read=False)
        run_until_power_off(p, vp)
        assert echoed[:3] == [(1, 0xAB), (2, 0xBEEF), (4, 0xDEADBEEF)]


def test_the_vp_resumes_with_the_registers_the_handler_set() -> None:
    with guest("io_echo") as (p, vp, _):
        out: list[int] = []

        def read(m):  # type: ignore[no-untyped-def]
            m.set_registers(rbx=0x1234_5678)
            return 0x42

        p.intercepts.install_io(0x10, 0x10, read, write=False)
        p.intercepts.install_io(0x11, 0x12, lambda m: out.append(m.value), read=False)
        run_until_power_off(p, vp)
        # the IN still delivered its value to AL, and RBX kept the handler's value
        assert out[0] == 0x42
        assert out[-1] == 0x1234_5678
