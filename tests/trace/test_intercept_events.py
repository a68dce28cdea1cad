"""The flight recorder sees every handled intercept of a running VP (port I/O, MMIO, MSRs) as a
typed event with the access and its handler's time, on both run loops; with nobody subscribed
nothing is recorded and the handlers the loops call are the plain ones."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pyhv.hypervisor import MsrIntercept, Partition
from pyhv.kvm import fastrun
from pyhv.trace.events import Event, IoEvent, MmioEvent, MsrEvent
from pyhv.trace.recorder import Recorder
from tests.guests.harness import guest, run_until_power_off

pytestmark = pytest.mark.guest

VALUE = 0x1122334455667788


@pytest.fixture(params=["c", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "python":
        monkeypatch.setattr(fastrun, "load", lambda: None)
    elif fastrun.load() is None:
        pytest.fail(f"the C run loop could not be built: {fastrun.why_unavailable()}")
    yield request.param


def _recorder(p: Partition) -> Recorder:
    """A recorder wired as the worker wires it: intercepts traced only while subscribed."""
    rec: Recorder

    def sources(on: bool) -> None:
        p.intercepts.set_tracer(rec.record if on else None)

    rec = Recorder(on_active=sources)
    return rec


def test_port_io_intercepts_are_recorded_with_port_direction_size_and_value(loop: str) -> None:
    with guest("io_echo") as (p, vp, _):
        rec = _recorder(p)
        seen: list[Event] = []
        rec.subscribe(seen.append)
        reads = iter([0xAB, 0xBEEF, 0xDEADBEEF])
        p.intercepts.install_io(0x10, 0x10, lambda m: next(reads), write=False)
        p.intercepts.install_io(0x11, 0x12, lambda m: None, read=False)
        run_until_power_off(p, vp)
        assert vp.loop_kind == loop
        io = [(e.port, e.direction, e.size, e.value) for e in seen if isinstance(e, IoEvent)]
        assert io[:6] == [
            (0x10, "in", 1, 0xAB),
            (0x11, "out", 1, 0xAB),
            (0x10, "in", 2, 0xBEEF),
            (0x11, "out", 2, 0xBEEF),
            (0x10, "in", 4, 0xDEADBEEF),
            (0x11, "out", 4, 0xDEADBEEF),
        ]
        assert io[-1][:2] == (0xF4, "out")  # the power-off write, installed while tracing
        assert all(e.vp == 0 and e.handler_ns > 0 for e in seen)
        assert rec.recorded == len(seen) == len(rec.snapshot())


def test_mmio_reads_and_writes_are_recorded_with_gpa_size_and_value(loop: str) -> None:
    with guest("mmio") as (p, vp, _):
        rec = _recorder(p)
        seen: list[Event] = []
        rec.subscribe(seen.append)
        p.intercepts.install_gpa(0xD0000000, 0x1000, lambda m: None if m.is_write else VALUE)
        run_until_power_off(p, vp)
        mmio = [e for e in seen if isinstance(e, MmioEvent)]
        reads = [(e.size, e.value) for e in mmio if e.direction == "read"]
        writes = [(e.size, e.value) for e in mmio if e.direction == "write"]
        assert reads[:4] == [(1, 0x88), (2, 0x7788), (4, 0x55667788), (8, VALUE)]
        assert writes[:4] == [(1, 0x88), (2, 0x7788), (4, 0x55667788), (8, VALUE)]
        assert all(0xD0000000 <= e.gpa < 0xD0001000 for e in mmio)


def test_msr_reads_writes_and_an_injected_gp_are_recorded(loop: str) -> None:
    with guest("msr") as (p, vp, _):
        rec = _recorder(p)
        seen: list[Event] = []
        rec.subscribe(seen.append)

        def synthetic(m: MsrIntercept) -> int | None:
            if m.msr == 0x40000002:
                m.inject_gp()
                return None
            return 0x0123_4567_89AB_CDEF if not m.is_write else None

        p.intercepts.install_msr([0x40000000, 0x40000001, 0x40000002], synthetic)
        p.intercepts.install_io(0x11, 0x13, lambda m: None, read=False)
        run_until_power_off(p, vp)
        msr = [(e.msr, e.direction, e.value, e.gp) for e in seen if isinstance(e, MsrEvent)]
        assert msr == [
            (0x40000000, "read", 0x0123_4567_89AB_CDEF, False),
            (0x40000001, "write", 0x0000_CAFE_0000_F00D, False),
            (0x40000001, "read", 0x0123_4567_89AB_CDEF, False),
            (0x40000002, "read", 0, True),
        ]


def test_with_no_subscriber_nothing_is_recorded_and_the_loops_call_the_plain_handlers(
    loop: str,
) -> None:
    with guest("io_echo") as (p, vp, _):
        rec = _recorder(p)
        calls: list[int] = []

        def device(m: object) -> int:
            calls.append(1)
            return 0x5A

        p.intercepts.install_io(0x10, 0x10, device, write=False)
        p.intercepts.install_io(0x11, 0x12, lambda m: None, read=False)
        unsubscribe = rec.subscribe(lambda e: None)
        entry = p.intercepts.io[0x10]
        assert entry is not None and entry.handler is not device  # traced while subscribed
        unsubscribe()
        assert entry.handler is device  # the plain handler again: nothing to test per exit
        run_until_power_off(p, vp)
        assert len(calls) == 3
        assert rec.recorded == 0 and not rec.snapshot()
