"""Virtual processors: suspended and resumed by the root, stopped by a triple fault or an error."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from pyhv.hypervisor import (
    InterceptKind,
    IoPortIntercept,
    Partition,
    VpEventKind,
    VpState,
    enter_long_mode,
)
from tests.guests.harness import STACK_TOP, guest, run_until_power_off
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest


def _u64(p: Partition, gpa: int) -> int:
    return int.from_bytes(p.read(gpa, 8), "little")


@contextmanager
def _witness() -> Iterator[Callable[[], None]]:
    """A VP of another partition spinning at CPL3: `elapse()` returns once it has counted a
    million more (bounded), time in which a guest that is not paused runs too."""
    with guest("spin_user", cpl=3, rflags=0x3002, partition_name="witness") as (p, vp, img):
        vp.start()

        def elapse() -> None:
            goal = _u64(p, img["counter"]) + 1_000_000
            wait_for(
                lambda: _u64(p, img["counter"]) >= goal,
                10,
                "the witness VP running a million steps",
                interval=0.001,
            )

        try:
            yield elapse
        finally:
            vp.stop()
            vp.wait(5)


def test_a_vp_spinning_at_cpl3_is_paused_stays_still_and_resumes() -> None:
    with _witness() as elapse, guest("spin_user", cpl=3, rflags=0x3002) as (p, vp, img):
        counter = img["counter"]
        vp.start()
        wait_for(lambda: _u64(p, counter), 5, "the guest counting", interval=0.005)
        for _ in range(3):
            vp.pause()
            assert vp.state is VpState.PAUSED
            assert vp.special_registers.cs.dpl == 3
            frozen = _u64(p, counter)
            elapse()
            assert _u64(p, counter) == frozen
            vp.resume()
            wait_for(lambda f=frozen: _u64(p, counter) > f, 5, "counting again", interval=0.001)
        vp.stop()
        ev = vp.wait(1)
        assert ev is not None and ev.kind is VpEventKind.STOPPED


def test_registers_of_a_running_vp_cannot_be_touched_without_pausing_it() -> None:
    with guest("spin_user", cpl=3, rflags=0x3002) as (_p, vp, _):
        vp.start()
        with pytest.raises(RuntimeError, match="pause\\(\\) it"):
            vp.registers  # noqa: B018
        vp.pause()
        assert vp.registers.rip >= 0x200000
        assert vp.special_registers.cs.dpl == 3


def test_a_triple_fault_is_reported_as_shutdown_with_the_registers() -> None:
    with guest("triple_fault") as (_p, vp, img):
        vp.start()
        ev = vp.wait(5)
        assert ev is not None and ev.kind is VpEventKind.SHUTDOWN
        assert ev.registers is not None and ev.registers.rbx == 0x7777
        assert vp.state is VpState.IDLE


def test_hlt_reaches_the_halt_intercept_when_no_in_kernel_lapic_waits_for_it() -> None:
    with guest("halt", irqchip=False, rbx=1) as (p, vp, _img):
        halts: list[int] = []
        out: list[int] = []
        p.intercepts.install_halt(lambda m: halts.append(m.vp_index) or m.set_registers(rbx=42))
        p.intercepts.install_io(0x12, 0x12, lambda m: out.append(m.value), read=False)
        p.intercepts.install_io(0xF4, 0xF4, lambda m: vp.pause(), read=False)
        vp.start()
        wait_for(lambda: vp.state is VpState.PAUSED, 5, "the VP paused", interval=0.005)
        assert halts == [0] and out == [42]
        assert p.counters["halt"]["count"] == 1


def test_hlt_without_a_halt_intercept_stops_the_vp_with_a_halt_event() -> None:
    with guest("halt", irqchip=False) as (_p, vp, _img):
        vp.start()
        ev = vp.wait(5)
        assert ev is not None and ev.kind is VpEventKind.HALT


def test_a_handler_that_raises_stops_its_vp_and_the_other_vp_keeps_running() -> None:
    with guest("vp_pair") as (p, vp0, img):
        vp1 = p.create_vp(1)
        enter_long_mode(p, vp1, img["second"], STACK_TOP - 0x10000)
        seen: list[int] = []

        def broken(m: IoPortIntercept) -> None:
            raise ValueError("device model bug")

        p.intercepts.install_io(0x31, 0x31, broken)
        p.intercepts.install_io(0x30, 0x30, lambda m: seen.append(m.value), read=False)
        vp1.start()
        vp0.start()
        ev = vp0.wait(5)
        assert ev is not None and ev.kind is VpEventKind.ERROR
        assert isinstance(ev.error, ValueError) and "port 0x31" in ev.detail
        before = len(seen)
        wait_for(lambda: len(seen) >= before + 10, 5, "VP 1 writing on", interval=0.005)
        assert vp1.state is VpState.RUNNING
        assert p.counters["io_port"]["errors"] == 1


def test_an_emulation_failure_is_reported_never_ignored() -> None:
    # int3 at CPL0 is an emulation failure on PVM; elsewhere, with no IDT, it ends in a triple
    # fault. Either way the VP stops and says why.
    source = ".code64\n.globl _start\n_start:\n  int3\n1: jmp 1b\n"
    with guest("int3", source=source) as (_p, vp, _):
        vp.start()
        ev = vp.wait(5)
        assert ev is not None and ev.kind in (VpEventKind.ERROR, VpEventKind.SHUTDOWN)
        assert ev.detail and ev.registers is not None


@pytest.mark.kvm
def test_counters_are_kept_for_every_intercept_kind() -> None:
    with guest("io_echo") as (p, _vp, _):
        assert set(p.counters) == {
            "io_port",
            "memory",
            "msr",
            "exception",
            "execute",
            "halt",
            "unknown",
        }
        assert all(
            set(c) == {"count", "defaulted", "errors", "handler_seconds"}
            for c in p.counters.values()
        )


def test_each_vps_counters_equal_the_exits_its_guest_made() -> None:
    """The guest makes a known number of exits of each kind (tests/guests/intercept_counts.S);
    VP 0's counters, and the partition's sums of them, equal those numbers exactly."""
    outs, ins, unclaimed_ports, mmio_reads, mmio_writes, unclaimed_mmio = 7, 5, 3, 11, 13, 2
    msr_pairs, unknown_msrs = 17, 4
    with guest(
        "intercept_counts",
        r8=outs, r9=ins, r10=unclaimed_ports, r11=mmio_reads, r12=mmio_writes,
        r13=unclaimed_mmio, r14=msr_pairs, r15=unknown_msrs,
    ) as (p, vp, _):  # fmt: skip
        calls = {"io_port": 0, "memory": 0, "msr": 0}

        def called(kind: str, value: int | None) -> Any:
            def handler(m: Any) -> int | None:
                calls[kind] += 1
                return value if not m.is_write else None

            return handler

        p.intercepts.install_io(0x10, 0x11, called("io_port", 0))
        p.intercepts.install_gpa(0xD0000000, 0x1000, called("memory", 0))
        p.intercepts.install_msr([0x40000000, 0x40000001], called("msr", 0))
        assert run_until_power_off(p, vp) is not None
        power_off = 1  # the OUT to port 0xf4 is an I/O intercept too (the harness's)
        expected = {
            "io_port": (outs + ins + unclaimed_ports + power_off, unclaimed_ports),
            "memory": (mmio_reads + mmio_writes + unclaimed_mmio, unclaimed_mmio),
            "msr": (2 * msr_pairs + unknown_msrs, unknown_msrs),
        }
        for kind, (count, defaulted) in expected.items():
            k = InterceptKind[kind.upper()]
            assert (vp.counts[k], vp.defaults[k], vp.errors[k]) == (count, defaulted, 0), kind
            c = p.counters[kind]
            assert (c["count"], c["defaulted"], c["errors"]) == (count, defaulted, 0), kind
        assert calls == {
            "io_port": outs + ins,
            "memory": mmio_reads + mmio_writes,
            "msr": 2 * msr_pairs,
        }
        for kind in ("exception", "execute", "halt", "unknown"):
            assert p.counters[kind]["count"] == 0, kind


def test_a_handler_can_stop_its_own_vp() -> None:
    with guest("io_echo") as (p, vp, _):
        p.intercepts.install_io(0x10, 0x10, lambda m: vp.stop() or 0, write=False)
        vp.start()
        ev = vp.wait(5)
        assert ev is not None and ev.kind is VpEventKind.STOPPED
        assert vp.state is VpState.IDLE
        assert p.counters["io_port"]["count"] == 1  # it stopped right after that intercept


def test_a_partition_pauses_and_resumes_all_its_vps() -> None:
    with _witness() as elapse, guest("vp_pair") as (p, vp0, img):
        vp1 = p.create_vp(1)
        enter_long_mode(p, vp1, img["second"], STACK_TOP - 0x10000)
        seen: list[int] = []
        p.intercepts.install_io(0x30, 0x30, lambda m: seen.append(m.value), read=False)
        p.intercepts.install_io(0x31, 0x31, lambda m: None, read=False)
        vp0.start()
        vp1.start()
        wait_for(lambda: len(seen) >= 5, 5, "five writes", interval=0.002)
        p.pause()
        assert {vp0.state, vp1.state} == {VpState.PAUSED}
        frozen = len(seen)
        elapse()
        assert len(seen) == frozen
        p.resume()
        wait_for(lambda: len(seen) >= frozen + 5, 5, "five more writes", interval=0.002)
        assert seen == list(range(1, len(seen) + 1))  # VP 1 went on from where it was


@contextmanager
def _counting_and_paused() -> Iterator[tuple[Any, Callable[[], int]]]:
    """A VP spinning at CPL3, paused once it counts: (the VP, a read of its count); at the end
    it must stop when asked (its thread was never left parked for good)."""
    with guest("spin_user", cpl=3, rflags=0x3002) as (p, vp, img):
        count = lambda: _u64(p, img["counter"])  # noqa: E731
        vp.start()
        wait_for(count, 5, "the guest counting", interval=0.005)
        vp.pause()
        yield vp, count
        vp.stop()
        ev = vp.wait(5)
        assert ev is not None and ev.kind is VpEventKind.STOPPED


def test_a_pause_right_after_a_resume_is_taken_and_the_next_resume_runs_the_vp() -> None:
    """resume() then pause() at once, before the parked VP thread woke from the resume (what
    the migration throttle and a failed migration's roll-back do, on a loaded host): every
    pause is taken, and the last resume() runs the VP again (a lost pause left the thread
    parked with nobody to wake it: the source VM stayed paused after a failed migration)."""
    with _counting_and_paused() as (vp, count):
        for i in range(200):
            vp.resume()
            try:
                vp.pause(timeout=2)
            except TimeoutError:
                pytest.fail(f"pause {i} right after a resume was not taken within 2 s")
            assert vp.state is VpState.PAUSED
        frozen = count()
        vp.resume()
        wait_for(lambda: count() > frozen, 5, "counting again", interval=0.001)


def test_a_resume_after_a_pause_that_timed_out_runs_the_vp() -> None:
    """A pause() that gave up (TimeoutError: the VP thread was not scheduled in time) and the
    resume() that follows it (the throttle's `finally`) leave the VP running, whatever the
    VP thread did meanwhile."""
    with _counting_and_paused() as (vp, count):
        for _ in range(100):
            vp.resume()
            # gives up after 1 ms, often before the VP thread (woken by the resume) took it
            with contextlib.suppress(TimeoutError):
                vp.pause(timeout=0.001)
            vp.resume()
            seen = count()
            wait_for(lambda s=seen: count() > s, 5, "counting again", interval=0.0005)
            vp.pause()
