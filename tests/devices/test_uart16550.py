"""COM1 behaves like a 16550A to the guest's driver, and nothing the guest writes disturbs it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.devices import uart16550 as u
from pyhv.devices.poweroff import PowerOff

pytestmark = pytest.mark.unit


class Wire:
    def __init__(self) -> None:
        self.out = bytearray()
        self.pulses = 0
        self.uart = u.Uart16550(self.out.extend, self.pulse)

    def pulse(self) -> None:
        self.pulses += 1


def test_bytes_written_to_thr_go_to_the_output() -> None:
    w = Wire()
    for b in b"hi\n":
        assert w.uart.read(u.LSR) & u.LSR_THRE
        w.uart.write(u.RBR_THR_DLL, b)
    assert bytes(w.out) == b"hi\n"


def test_host_input_is_received_through_rbr_with_data_ready_in_lsr() -> None:
    w = Wire()
    assert not w.uart.read(u.LSR) & u.LSR_DR
    w.uart.feed(b"ab")
    got = bytearray()
    while w.uart.read(u.LSR) & u.LSR_DR:
        got.append(w.uart.read(u.RBR_THR_DLL))
    assert bytes(got) == b"ab"
    assert w.uart.read(u.RBR_THR_DLL) == 0


def test_host_input_larger_than_the_fifo_is_not_lost() -> None:
    w = Wire()
    w.uart.write(u.IIR_FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    data = bytes(range(256)) * 4
    w.uart.feed(data)
    got = bytearray()
    while w.uart.read(u.LSR) & u.LSR_DR:
        got.append(w.uart.read(u.RBR_THR_DLL))
    assert bytes(got) == data


def test_input_fed_after_a_save_that_holds_it_is_held_then_taken_or_released() -> None:
    # a migrating source: input typed after its state was saved goes with COMMIT, not to the
    # guest here; a rolled back migration gives it to the guest after all
    w = Wire()
    w.uart.feed(b"a")
    saved = w.uart.save(hold_input=True)
    assert saved.rx + saved.backlog == b"a"
    assert w.uart.feed(b"bc") == 2
    assert w.uart.pending_input == 1  # only what came before the save
    assert w.uart.take_held() == b"bc"
    w.uart.feed(b"d")
    w.uart.release_held()
    assert w.uart.take_held() == b""
    got = bytearray()
    while w.uart.read(u.LSR) & u.LSR_DR:
        got.append(w.uart.read(u.RBR_THR_DLL))
    assert bytes(got) == b"ad"
    w.uart.feed(b"e")  # no longer held
    assert w.uart.pending_input == 1


def test_received_data_interrupts_only_when_ier_allows_it() -> None:
    w = Wire()
    w.uart.feed(b"x")
    assert w.pulses == 0
    assert w.uart.read(u.IIR_FCR) == u.IIR_NO_INT
    w.uart.write(u.IER_DLM, u.IER_RDA)
    assert w.pulses == 1
    assert w.uart.read(u.IIR_FCR) == u.IIR_RDA
    w.uart.read(u.RBR_THR_DLL)
    assert w.uart.read(u.IIR_FCR) == u.IIR_NO_INT
    assert not w.uart.irq_level


def test_each_new_input_after_the_guest_drained_the_fifo_pulses_the_line_again() -> None:
    w = Wire()
    w.uart.write(u.IER_DLM, u.IER_RDA)
    w.uart.feed(b"a")
    w.uart.feed(b"b")  # the line is still high: no second edge
    assert w.pulses == 1
    w.uart.read(u.RBR_THR_DLL)
    w.uart.read(u.RBR_THR_DLL)
    w.uart.feed(b"c")
    assert w.pulses == 2


def test_with_fifos_enabled_iir_reports_fifo_mode_and_a_timeout_below_the_trigger() -> None:
    w = Wire()
    w.uart.write(u.IIR_FCR, 0xC7)  # enable, clear both, trigger 14
    w.uart.write(u.IER_DLM, u.IER_RDA)
    w.uart.feed(b"abc")
    assert w.uart.read(u.IIR_FCR) == 0xC0 | u.IIR_TIMEOUT
    w.uart.feed(b"x" * 11)
    assert w.uart.read(u.IIR_FCR) == 0xC0 | u.IIR_RDA


def test_thre_interrupt_is_raised_when_enabled_and_acknowledged_by_reading_iir() -> None:
    w = Wire()
    w.uart.write(u.IER_DLM, u.IER_THRE)
    assert w.pulses == 1
    assert w.uart.read(u.IIR_FCR) == u.IIR_THRE
    assert w.uart.read(u.IIR_FCR) == u.IIR_NO_INT
    w.uart.write(u.RBR_THR_DLL, ord("z"))
    assert w.uart.read(u.IIR_FCR) == u.IIR_THRE
    assert w.pulses == 2


def test_dlab_exposes_the_divisor_latch_and_sets_the_baud_rate() -> None:
    w = Wire()
    w.uart.write(u.IER_DLM, 0x05)
    w.uart.write(u.LCR, 0x83)
    w.uart.write(u.RBR_THR_DLL, 0x0C)
    w.uart.write(u.IER_DLM, 0x00)
    assert (w.uart.read(u.RBR_THR_DLL), w.uart.read(u.IER_DLM)) == (0x0C, 0)
    w.uart.write(u.LCR, 0x03)
    assert w.uart.baud == 9600
    assert w.uart.read(u.IER_DLM) == 0x05  # IER was untouched by the divisor writes
    assert w.out == b""


def test_loopback_returns_transmitted_bytes_and_mirrors_modem_lines() -> None:
    w = Wire()
    w.uart.write(u.MCR, u.MCR_LOOP | u.MCR_RTS | u.MCR_OUT2)
    msr = w.uart.read(u.MSR)
    assert msr & 0xF0 == u.MSR_CTS | u.MSR_DCD
    assert msr & u.MSR_DDSR  # DSR dropped as loopback began
    assert w.uart.read(u.MSR) & 0x0F == 0  # deltas clear on read
    w.uart.write(u.RBR_THR_DLL, 0x42)
    assert w.out == b""
    assert w.uart.read(u.LSR) & u.LSR_DR
    assert w.uart.read(u.RBR_THR_DLL) == 0x42
    w.uart.write(u.RBR_THR_DLL, 1)
    w.uart.write(u.RBR_THR_DLL, 2)  # no FIFO: the second byte overruns
    assert w.uart.read(u.LSR) & u.LSR_OE
    assert not w.uart.read(u.LSR) & u.LSR_OE


def test_loopback_disconnects_host_input_until_it_ends() -> None:
    w = Wire()
    w.uart.write(u.MCR, u.MCR_LOOP)
    w.uart.feed(b"h")
    assert not w.uart.read(u.LSR) & u.LSR_DR
    w.uart.write(u.MCR, 0)
    assert w.uart.read(u.RBR_THR_DLL) == ord("h")


def test_line_status_interrupt_has_priority_over_received_data() -> None:
    w = Wire()
    w.uart.write(u.MCR, u.MCR_LOOP)
    w.uart.write(u.IER_DLM, u.IER_RLS | u.IER_RDA)
    w.uart.write(u.RBR_THR_DLL, 1)
    w.uart.write(u.RBR_THR_DLL, 2)
    assert w.uart.read(u.IIR_FCR) == u.IIR_RLS
    w.uart.read(u.LSR)
    assert w.uart.read(u.IIR_FCR) == u.IIR_RDA


def test_scratch_register_holds_a_byte() -> None:
    w = Wire()
    w.uart.write(u.SCR, 0xA5)
    assert w.uart.read(u.SCR) == 0xA5


def test_wide_port_accesses_are_split_into_byte_accesses() -> None:
    w = Wire()
    w.uart.io_write(u.SCR - 1, 2, 0x5A00)  # MSR (ignored) then SCR
    assert w.uart.io_read(u.SCR, 4) == 0xFFFFFF5A


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 12), st.integers(1, 4), st.integers(0, 2**32 - 1))))
def test_garbage_written_to_any_register_never_disturbs_the_model(
    ops: list[tuple[int, int, int]],
) -> None:
    w = Wire()
    for offset, size, value in ops:
        w.uart.io_write(offset, size, value)
        w.uart.io_read(offset, size)
    # Whatever state the guest left, a driver that resets the chip gets a working port.
    for reg, value in ((u.LCR, 0x03), (u.MCR, 0x0B), (u.IER_DLM, 0), (u.IIR_FCR, 0x07)):
        w.uart.write(reg, value)
    w.out.clear()
    w.uart.write(u.RBR_THR_DLL, ord("k"))
    assert w.out == b"k"
    w.uart.feed(b"q")
    assert w.uart.read(u.LSR) & u.LSR_DR
    assert w.uart.read(u.RBR_THR_DLL) == ord("q")


def test_a_write_to_the_poweroff_port_reports_the_status_once() -> None:
    seen: list[int] = []
    p = PowerOff(seen.append)
    p.io_write(4, 0x1_0000_0003)
    p.io_write(1, 7)
    assert seen == [3] and p.status == 3
    assert p.io_read(1) == 0xFF
