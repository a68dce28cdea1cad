"""Interrupts the root asserts for a partition: to one VP, on an IOAPIC pin, through an irqfd;
and doorbells (ioeventfd) the guest rings without an intercept."""

from __future__ import annotations

import os

import pytest

from pyhv.hypervisor import Partition, VpState
from pyhv.kvm.fds import VcpuStats
from tests.guests.harness import guest, run_until_power_off
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest


def _halted(stats: VcpuStats, halts: int) -> bool:
    """Until the VP sleeps in its `halts`-th HLT (KVM's own counts: halt_exits, blocking)."""
    return wait_for(
        lambda: (s := stats.read())["halt_exits"] == halts and s["blocking"] == 1,
        5,
        f"the VP asleep in its HLT number {halts}",
        interval=0.002,
    )


def test_interrupts_reach_a_halted_guest_by_vector_pin_and_irqfd() -> None:
    with guest("interrupts") as (p, vp, _):
        ready: list[int] = []
        got: list[int] = []
        p.intercepts.install_io(0x10, 0x10, lambda m: ready.append(1), read=False)
        p.intercepts.install_io(0x11, 0x11, lambda m: got.append(m.value), read=False)
        stats = vp.vcpu.open_stats()  # before the VP runs: opening waits for the vCPU's lock
        try:
            vp.start()
            assert wait_for(lambda: ready, 5, "ready", interval=0.002)
            # Before each interrupt the guest sleeps in HLT; each interrupt wakes it, its
            # handler reports, and it halts once more.
            assert _halted(stats, 1)
            p.interrupt(0, 0x40)
            assert wait_for(lambda: got == [0x40], 5, "got == [0x40]", interval=0.002) and _halted(
                stats, 2
            )
            p.pulse_irq(5)  # IOAPIC pin 5 -> vector 0x41 as the guest programmed it
            assert wait_for(
                lambda: got == [0x40, 0x41], 5, "got == [0x40, 0x41]", interval=0.002
            ) and _halted(stats, 3)
            fd = p.irqfd(5)
            os.write(fd, (1).to_bytes(8, "little"))
            assert wait_for(
                lambda: got == [0x40, 0x41, 0x41], 5, "got == [0x40, 0x41, 0x41]", interval=0.002
            ) and _halted(stats, 4)
            msi = p.msi_irqfd(0, 0x40)  # a GSI of its own routed as an MSI: vector 0x40 to VP 0
            os.write(msi, (1).to_bytes(8, "little"))
            assert wait_for(
                lambda: got == [0x40, 0x41, 0x41, 0x40],
                5,
                "got == [0x40, 0x41, 0x41, 0x40]",
                interval=0.002,
            ) and _halted(stats, 5)
            p.pulse_irq(5)  # the default IOAPIC routes survived the new routing table
            assert wait_for(
                lambda: got == [0x40, 0x41, 0x41, 0x40, 0x41],
                5,
                "got == [0x40, 0x41, 0x41, 0x40, 0x41]",
                interval=0.002,
            ) and _halted(stats, 6)
            assert vp.state is VpState.RUNNING
        finally:
            stats.close()


@pytest.mark.kvm
def test_bad_interrupt_requests_are_refused() -> None:
    with Partition("irq") as p:
        p.create_vp(0)
        with pytest.raises(ValueError, match="no VP 3"):
            p.interrupt(3, 0x40)
        with pytest.raises(ValueError, match="vector 5 is out of range"):
            p.interrupt(0, 5)
        with pytest.raises(ValueError, match="pin 24"):
            p.irq_line(24, True)


def test_an_ioeventfd_doorbell_counts_guest_writes_without_intercepts() -> None:
    with guest("doorbell", rcx=5) as (p, vp, _):
        threes = p.ioeventfd(0x50, 4, datamatch=3)
        others: list[int] = []
        p.intercepts.install_io(0x50, 0x50, lambda m: others.append(m.value), read=False)
        run_until_power_off(p, vp)
        # the write of 3 rang the doorbell in the kernel; the rest came to the intercept
        assert int.from_bytes(os.read(threes.fd, 8), "little") == 1
        assert others == [0, 1, 2, 4]
        threes.remove()
