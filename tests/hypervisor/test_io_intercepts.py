"""I/O port intercepts: the handler's value reaches the guest, the guest's writes reach the handler."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import AccessType, InterceptError, IoPortIntercept
from tests.guests.harness import guest, run_until_power_off

pytestmark = pytest.mark.guest


def test_an_in_instruction_receives_the_value_the_handler_returns_for_sizes_1_2_4() -> None:
    with guest("io_echo") as (p, vp, _):
        reads = iter([0xAB, 0xBEEF, 0xDEADBEEF])
        echoed: list[tuple[int, int]] = []
        p.intercepts.install_io(0x10, 0x10, lambda m: next(reads), write=False)
        p.intercepts.install_io(
            0x11, 0x12, lambda m: echoed.append((m.access_size, m.value)), read=False
        )
        run_until_power_off(p, vp)
        assert echoed[:3] == [(1, 0xAB), (2, 0xBEEF), (4, 0xDEADBEEF)]


def test_the_vp_resumes_with_the_registers_the_handler_set() -> None:
    with guest("io_echo") as (p, vp, _):
        out: list[int] = []

        def read(m: IoPortIntercept) -> int:
            m.set_registers(rbx=0x1234_5678)
            return 0x42

        p.intercepts.install_io(0x10, 0x10, read, write=False)
        p.intercepts.install_io(0x11, 0x12, lambda m: out.append(m.value), read=False)
        run_until_power_off(p, vp)
        # the IN still delivered its value to AL, and RBX kept the handler's value
        assert out[0] == 0x42
        assert out[-1] == 0x1234_5678


def test_the_message_carries_the_header_fields_of_the_hyper_v_io_message() -> None:
    with guest("io_echo") as (p, vp, img):
        seen: list[tuple[int, AccessType, int, int, int, int]] = []

        def read(m: IoPortIntercept) -> int:
            seen.append((m.vp_index, m.access_type, m.port, m.rip, m.cs.selector, m.cpl))
            return 0

        p.intercepts.install_io(0x10, 0x10, read, write=False)
        run_until_power_off(p, vp)
        assert seen[0] == (0, AccessType.READ, 0x10, img.entry + 4, 0x10, 0)


def test_string_io_delivers_outsb_and_rep_outsb_data_and_fills_rep_insb() -> None:
    with guest("io_string") as (p, vp, img):
        sent = bytearray()
        supply = bytearray(b"pyhv-8by")
        echoed = bytearray()

        def insb(m: IoPortIntercept) -> bytes:
            chunk = bytes(supply[: m.count])
            del supply[: m.count]
            return chunk

        def collect(into: bytearray):  # type: ignore[no-untyped-def]
            return lambda m: into.extend(m.data if m.count > 1 else bytes([m.value]))

        p.intercepts.install_io(0x120, 0x120, collect(sent), read=False)
        p.intercepts.install_io(0x121, 0x121, insb, write=False)
        p.intercepts.install_io(0x122, 0x122, collect(echoed), read=False)
        run_until_power_off(p, vp)
        assert bytes(sent) == b"Hello"
        assert bytes(echoed) == b"pyhv-8by"
        assert p.read(img["buf"], 8) == b"pyhv-8by"


def test_ports_nobody_intercepts_read_as_all_ones_and_are_counted() -> None:
    with guest("io_echo") as (p, vp, _):
        out: list[int] = []
        p.intercepts.install_io(0x11, 0x11, lambda m: out.append(m.value), read=False)
        run_until_power_off(p, vp)
        assert out == [0xFF, 0xFFFF, 0xFFFFFFFF]
        c = p.counters["io_port"]
        assert c["defaulted"] == 4  # three reads of 0x10 and the write to 0x12
        assert c["count"] == 8


def test_an_uninstalled_intercept_no_longer_sees_the_port() -> None:
    with guest("io_echo") as (p, vp, _):
        calls: list[int] = []
        h = p.intercepts.install_io(0x10, 0x10, lambda m: calls.append(1) or 0)
        h.uninstall()
        run_until_power_off(p, vp)
        assert calls == []


@pytest.mark.kvm
def test_two_intercepts_on_one_port_are_refused_with_a_clear_error() -> None:
    with guest("io_echo") as (p, _vp, _):
        p.intercepts.install_io(0x10, 0x1F, lambda m: 0)
        with pytest.raises(InterceptError, match="port 0x18 already has an intercept"):
            p.intercepts.install_io(0x18, 0x18, lambda m: 0)
        with pytest.raises(InterceptError, match="invalid"):
            p.intercepts.install_io(0x20, 0x10000, lambda m: 0)
        with pytest.raises(InterceptError, match="in-kernel master 8259 PIC"):
            p.intercepts.install_io(0x21, 0x21, lambda m: 0)
