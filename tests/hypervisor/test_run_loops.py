"""The VP run loop exists twice: in C (pyhv/kvm/_runloop.c, used wherever it can be built) and in
Python (the fallback). Both must behave alike: the intercept and VP tests of this folder run here
again on the Python loop (the rest of the suite runs on the C loop), and the cases where the two
differ most in code (a handler's result of the wrong type, a handler that raises, bytes for an
IN) run on both.

The one test module that imports other test modules, by design: it reruns their test functions
(tests/test_layout.py names it as its only exception)."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from pyhv.hypervisor import VpEventKind
from pyhv.hypervisor.vp import VirtualProcessor
from pyhv.kvm import fastrun
from tests.guests.harness import guest, run_until_power_off
from tests.hypervisor import (
    test_exceptions_and_execute,
    test_io_intercepts,
    test_memory_intercepts,
    test_msr_intercepts,
    test_virtual_processors,
)

pytestmark = pytest.mark.guest

MODULES = (
    test_io_intercepts,
    test_memory_intercepts,
    test_msr_intercepts,
    test_exceptions_and_execute,
    test_virtual_processors,
)
CASES = [
    pytest.param(
        f, id=f"{m.__name__.rsplit('.', 1)[1]}::{name}", marks=getattr(f, "pytestmark", [])
    )
    for m in MODULES
    for name, f in vars(m).items()
    if name.startswith("test_") and inspect.isfunction(f) and not inspect.signature(f).parameters
]
#: Tests of these modules that start no VP (they check refusals): no run loop to compare.
NO_VP = {
    "test_two_intercepts_on_one_port_are_refused_with_a_clear_error",
    "test_bad_memory_requests_get_clear_errors",
    "test_msrs_too_far_apart_for_the_kvm_filter_are_refused",
    "test_a_fifth_execute_intercept_is_refused_there_are_four_breakpoint_registers",
    "test_exception_vectors_kvm_cannot_deliver_are_refused_clearly",
    "test_counters_are_kept_for_every_intercept_kind",
}
CASES = [c for c in CASES if c.values[0].__name__ not in NO_VP]


def _record_loops(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    kinds: list[str] = []
    real = VirtualProcessor._fast_runner

    def spy(self: VirtualProcessor, *args: object) -> object:
        runner = real(self, *args)
        kinds.append(self.loop_kind)
        return runner

    monkeypatch.setattr(VirtualProcessor, "_fast_runner", spy)
    return kinds


def _require_c_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C loop for this test even under PYHV_NO_FASTRUN (which the suite may set to run
    everything else on the Python loop); a machine with gcc and Python's headers builds it."""
    if fastrun.disabled():
        monkeypatch.delenv(fastrun.DISABLE_ENV)
        monkeypatch.setattr(fastrun, "_why_not", None)
    if fastrun.load() is None:
        pytest.fail(f"the C run loop could not be built: {fastrun.why_unavailable()}")


@pytest.fixture(params=["c", "python"])
def loop(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "python":
        monkeypatch.setattr(fastrun, "load", lambda: None)
    else:
        _require_c_loop(monkeypatch)
    kinds = _record_loops(monkeypatch)
    yield request.param
    assert kinds and set(kinds) == {request.param}


@pytest.mark.parametrize("case", CASES)
def test_the_python_loop_passes_the_intercept_and_vp_tests_too(
    case: Callable[[], None], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fastrun, "load", lambda: None)
    kinds = _record_loops(monkeypatch)
    case()
    assert kinds and set(kinds) == {"python"}  # it started a VP, and only on the Python loop


def test_vps_run_the_c_loop_unless_it_is_disabled() -> None:
    with guest("io_echo") as (p, vp, _):
        p.intercepts.install_io(0x10, 0x10, lambda m: 0, write=False)
        run_until_power_off(p, vp)
        if fastrun.disabled():
            assert vp.loop_kind == "python"
        else:
            assert fastrun.load() is not None, fastrun.why_unavailable()
            assert vp.loop_kind == "c"


@pytest.mark.unit
def test_pyhv_no_fastrun_selects_the_python_loop() -> None:
    code = "from pyhv.kvm import fastrun; print(fastrun.load(), fastrun.why_unavailable())"
    env = {**os.environ, fastrun.DISABLE_ENV: "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split()[0] == "None"
    assert fastrun.DISABLE_ENV in out.stdout


def _stops_with(source: str, install: Callable[..., object], kind: type, detail: str) -> None:
    with guest("bad_result", source=source) as (p, vp, _):
        install(p)
        vp.start()
        ev = vp.wait(5)
        assert ev is not None and ev.kind is VpEventKind.ERROR, ev
        assert isinstance(ev.error, kind), ev.error
        assert detail in ev.detail
        assert vp.state.value == "idle"


IN_PORT = ".code64\n.globl _start\n_start:\n  inb $0x10, %al\n1: jmp 1b\n"
MMIO_READ = (
    ".code64\n.globl _start\n_start:\n  mov $0xd0000000, %rbx\n  movl (%rbx), %eax\n1: jmp 1b\n"
)
RDMSR = ".code64\n.globl _start\n_start:\n  mov $0x40000000, %ecx\n  rdmsr\n1: jmp 1b\n"


def test_a_read_handler_returning_no_int_stops_the_vp_on_both_loops(loop: str) -> None:
    _stops_with(
        IN_PORT,
        lambda p: p.intercepts.install_io(0x10, 0x10, lambda m: "x", write=False),
        TypeError,
        "I/O port 0x10",
    )
    _stops_with(
        MMIO_READ,
        lambda p: p.intercepts.install_gpa(0xD0000000, 0x1000, lambda m: None),
        TypeError,
        "GPA 0xd0000000",
    )
    _stops_with(
        RDMSR,
        lambda p: p.intercepts.install_msr(0x40000000, lambda m: 1.5),
        TypeError,
        "MSR 0x40000000",
    )


def test_a_handler_that_raises_is_reported_with_its_exception_on_both_loops(loop: str) -> None:
    def boom(m: object) -> int:
        raise KeyError("device bug")

    _stops_with(IN_PORT, lambda p: p.intercepts.install_io(0x10, 0x10, boom), KeyError, "0x10")
    _stops_with(
        MMIO_READ, lambda p: p.intercepts.install_gpa(0xD0000000, 0x1000, boom), KeyError, "GPA"
    )
    _stops_with(RDMSR, lambda p: p.intercepts.install_msr(0x40000000, boom), KeyError, "MSR")


def test_in_takes_bytes_or_an_int_subclass_and_counts_it_on_both_loops(loop: str) -> None:
    with guest("io_echo") as (p, vp, _):
        reads = iter([b"\xab", True, b"\xef\xbe\xad\xde"])
        echoed: list[tuple[int, int]] = []

        def read(m: object) -> object:
            return next(reads, 0)

        p.intercepts.install_io(0x10, 0x10, read, write=False)
        p.intercepts.install_io(
            0x11, 0x12, lambda m: echoed.append((m.access_size, m.value)), read=False
        )
        run_until_power_off(p, vp)
        assert echoed == [(1, 0xAB), (2, 1), (4, 0xDEADBEEF), (4, 0)]
        c = p.counters["io_port"]
        # three INs, four OUTs to 0x11-0x12 and the power-off OUT, each through a handler
        assert (c["count"], c["defaulted"], c["errors"]) == (8, 0, 0)
        assert c["handler_seconds"] > 0


LOOP_MMIO = (
    ".code64\n.globl _start\n_start:\n  mov $0xd0000000, %rbx\n"
    "1: movl (%rbx), %eax\n  outb %al, $0x11\n  jmp 1b\n"
)
LOOP_RDMSR = ".code64\n.globl _start\n_start:\n1: mov $0x40000000, %ecx\n  rdmsr\n  outb %al, $0x11\n  jmp 1b\n"


@pytest.mark.parametrize("what", ["gpa", "msr"])
def test_a_replaced_intercept_is_the_one_called_at_the_next_access_on_both_loops(
    loop: str, what: str
) -> None:
    # the C loop remembers the last GPA range and MSR it looked up: not across a new table
    with guest("swap", source=LOOP_MMIO if what == "gpa" else LOOP_RDMSR) as (p, vp, _):
        seen: list[int] = []

        def install(value: int) -> object:
            if what == "gpa":
                return p.intercepts.install_gpa(0xD0000000, 0x1000, lambda m: value)
            return p.intercepts.install_msr(0x40000000, lambda m: value)

        handle = [install(1)]

        def report(m: object) -> None:
            seen.append(m.value)  # type: ignore[attr-defined]
            if len(seen) == 5:
                handle[0].uninstall()  # type: ignore[attr-defined]
                handle[0] = install(2)
            elif len(seen) == 10:
                vp.pause()

        p.intercepts.install_io(0x11, 0x11, report, read=False)
        vp.start()
        event = None
        for _ in range(1000):  # up to 10 s
            if vp.state.value != "running":
                break
            event = vp.wait(0.01)
        assert vp.state.value == "paused", event
        assert seen == [1] * 5 + [2] * 5
