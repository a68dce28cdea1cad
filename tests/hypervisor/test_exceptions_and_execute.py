"""Execute intercepts (hardware breakpoints) and the exception intercepts KVM can deliver."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import AccessType, InterceptError, MemoryIntercept
from tests.guests.harness import guest, run_until_power_off

pytestmark = pytest.mark.guest


def test_an_execute_intercept_fires_each_time_the_guest_runs_the_instruction() -> None:
    with guest("breakpoint") as (p, vp, img):
        hits: list[tuple[AccessType, int, int, int]] = []

        def on_execute(m: MemoryIntercept) -> None:
            hits.append((m.access_type, m.gva or 0, m.gpa, m.rip))

        p.intercepts.install_execute(img["target"], on_execute)
        out: list[int] = []
        p.intercepts.install_io(0x12, 0x12, lambda m: out.append(m.value), read=False)
        run_until_power_off(p, vp)
        t = img["target"]
        assert hits == [(AccessType.EXECUTE, t, t, t)] * 3
        assert out == [3]  # the guest ran `target` three times, once per intercept


def test_an_execute_handler_can_change_the_registers_the_guest_sees() -> None:
    with guest("breakpoint") as (p, vp, img):
        p.intercepts.install_execute(
            img["target"], lambda m: m.set_registers(rax=m.registers.rax + 100)
        )
        out: list[int] = []
        p.intercepts.install_io(0x12, 0x12, lambda m: out.append(m.value), read=False)
        run_until_power_off(p, vp)
        assert out == [303]


@pytest.mark.kvm
def test_a_fifth_execute_intercept_is_refused_there_are_four_breakpoint_registers() -> None:
    with guest("breakpoint") as (p, _vp, _):
        for i in range(4):
            p.intercepts.install_execute(0x300000 + i, lambda m: None)
        with pytest.raises(InterceptError, match="all 4 hardware breakpoints"):
            p.intercepts.install_execute(0x300010, lambda m: None)


@pytest.mark.kvm
def test_exception_vectors_kvm_cannot_deliver_are_refused_clearly() -> None:
    with guest("breakpoint") as (p, _vp, _):
        with pytest.raises(InterceptError, match="only #DB \\(1\\) and #BP \\(3\\)"):
            p.intercepts.install_exception(14, lambda m: None)
        h = p.intercepts.install_exception(3, lambda m: None)
        h.uninstall()


def test_a_debug_exception_intercept_single_steps_the_vp_until_uninstalled() -> None:
    with guest("io_echo") as (p, vp, img):
        steps: list[int] = []

        def on_db(m) -> None:  # type: ignore[no-untyped-def]
            steps.append(m.pc)
            if len(steps) == 3:
                handle.uninstall()

        handle = p.intercepts.install_exception(1, on_db)
        p.intercepts.install_io(0x10, 0x10, lambda m: 0, write=False)
        run_until_power_off(p, vp)
        # each #DB arrives after one instruction: mov $0x10,%dx (4 bytes), inb (1), ...
        assert steps[:2] == [img.entry + 4, img.entry + 5]
        # ... outb (2) exits to user space, and KVM reports no step for an instruction it
        # completes after such an exit: the next one comes after inw (2)
        assert steps[2] in (img.entry + 7, img.entry + 9)
        assert p.counters["exception"]["count"] == 3
