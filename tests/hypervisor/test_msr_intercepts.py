"""MSR intercepts: RDMSR gets the handler's value, WRMSR's value reaches it, #GP on request; an
MSR without an intercept is KVM's (it holds what the guest wrote, or it raises #GP)."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import InterceptError, MsrIntercept, Partition
from tests.guests.harness import guest, run_until_power_off

pytestmark = pytest.mark.guest


def _ports(p: Partition) -> tuple[list[int], list[int]]:
    """What the msr guest reports: RDMSR results (port 0x11, low then high 32 bits) and the
    RIP of each #GP its vector 13 handler received (port 0x13)."""
    reports: list[int] = []
    gps: list[int] = []
    p.intercepts.install_io(0x11, 0x11, lambda m: reports.append(m.value), read=False)
    p.intercepts.install_io(0x13, 0x13, lambda m: gps.append(m.value), read=False)
    return reports, gps


def test_rdmsr_wrmsr_and_gp_travel_between_guest_and_handler() -> None:
    with guest("msr") as (p, vp, img):
        log: list[tuple[int, bool, int]] = []

        def synthetic(m: MsrIntercept) -> int | None:
            log.append((m.msr, m.is_write, m.value))
            if m.msr == 0x40000002:
                m.inject_gp()
                return None
            return 0x0123_4567_89AB_CDEF if not m.is_write else None

        p.intercepts.install_msr([0x40000000, 0x40000001, 0x40000002], synthetic)
        reports, gps = _ports(p)
        run_until_power_off(p, vp)
        assert reports == [0x89AB_CDEF, 0x0123_4567] * 2
        assert log == [
            (0x40000000, False, 0),
            (0x40000001, True, 0x0000_CAFE_0000_F00D),
            (0x40000001, False, 0),
            (0x40000002, False, 0),
        ]
        # The guest's #GP handler ran for exactly two instructions: 0x40000002 (the handler's
        # #GP) and 0x40000003 (KVM does not know it and nobody intercepts it: #GP by default).
        assert gps == [img["rd2"], img["rd3"]]
        c = p.counters["msr"]
        assert (c["count"], c["defaulted"], c["errors"]) == (5, 1, 0)


def test_a_read_only_msr_intercept_leaves_writes_to_kvm() -> None:
    with guest("msr") as (p, vp, img):
        log: list[tuple[bool, int]] = []

        def read_only(m: MsrIntercept) -> int:
            log.append((m.is_write, m.value))
            return 0x1234

        p.intercepts.install_msr(0x40000001, read_only, write=False)
        reports, gps = _ports(p)
        run_until_power_off(p, vp)
        # Only the read of 0x40000001 came to the handler (so the intercept is installed) ...
        assert log == [(False, 0)]
        assert reports == [0, 0, 0x1234, 0]
        # ... while the WRMSR went to KVM, which does not know 0x40000001: a #GP at `wr1`, as
        # at every MSR here without an intercept.
        assert gps == [img["rd0"], img["wr1"], img["rd2"], img["rd3"]]
        c = p.counters["msr"]
        assert (c["count"], c["defaulted"]) == (5, 4)


KERNEL_GS_BASE = (
    '#include "guest.h"\n.code64\n.globl _start\n_start:\n'
    "    SET_GATE(13, gp)\n    lidt idtr(%rip)\n"
    "    mov $0xc0000102, %ecx\n    mov $0x89abcdef, %eax\n    mov $0x00007fff, %edx\n"
    "    wrmsr\n    xor %eax, %eax\n    xor %edx, %edx\n    rdmsr\n"
    "    shl $32, %rdx\n    or %rdx, %rax\n    REPORT64(%rax)\n    POWER_OFF\n"
    "gp: mov $0xee, %al\n    outb %al, $0x13\n    POWER_OFF\nIDT_DATA\n"
)


def test_an_msr_kvm_knows_stays_with_kvm_unless_intercepted() -> None:
    # No intercept: KVM holds IA32_KERNEL_GS_BASE; the guest reads back the (canonical) address
    # it wrote and no MSR exit reaches user space.
    with guest("kernel_gs_base", source=KERNEL_GS_BASE) as (p, vp, _):
        reports, gps = _ports(p)
        run_until_power_off(p, vp)
        assert reports == [0x89AB_CDEF, 0x7FFF] and gps == []
        assert p.counters["msr"]["count"] == 0
    # The same guest with an intercept on it: both accesses come to the handler instead.
    with guest("kernel_gs_base", source=KERNEL_GS_BASE) as (p, vp, _):
        log: list[tuple[int, bool, int]] = []

        def handler(m: MsrIntercept) -> int | None:
            log.append((m.msr, m.is_write, m.value))
            return None if m.is_write else 0x5555

        p.intercepts.install_msr(0xC0000102, handler)
        reports, gps = _ports(p)
        run_until_power_off(p, vp)
        assert log == [(0xC0000102, True, 0x7FFF_89AB_CDEF), (0xC0000102, False, 0)]
        assert reports == [0x5555, 0] and gps == []
        assert (p.counters["msr"]["count"], p.counters["msr"]["defaulted"]) == (2, 0)


@pytest.mark.kvm
def test_msrs_too_far_apart_for_the_kvm_filter_are_refused() -> None:
    with guest("msr") as (p, _vp, _):
        spread = [i * 0x10000 for i in range(9)]  # 9 ranges for read + 9 for write > 16
        with pytest.raises(InterceptError, match="filter ranges"):
            p.intercepts.install_msr(spread, lambda m: 0)
        assert p.intercepts.msr == {}  # nothing half-installed
