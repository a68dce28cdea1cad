"""MSR intercepts: RDMSR gets the handler's value, WRMSR's value reaches it, #GP on request."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import InterceptError, MsrIntercept
from tests.guests.harness import guest, run_until_power_off

pytestmark = pytest.mark.guest


def test_rdmsr_wrmsr_and_gp_travel_between_guest_and_handler() -> None:
    with guest("msr") as (p, vp, _):
        log: list[tuple[int, bool, int]] = []

        def synthetic(m: MsrIntercept) -> int | None:
            log.append((m.msr, m.is_write, m.value))
            if m.msr == 0x40000002:
                m.inject_gp()
                return None
            return 0x0123_4567_89AB_CDEF if not m.is_write else None

        p.intercepts.install_msr([0x40000000, 0x40000001, 0x40000002], synthetic)
        reports: list[int] = []
        gps: list[int] = []
        p.intercepts.install_io(0x11, 0x11, lambda m: reports.append(m.value), read=False)
        p.intercepts.install_io(0x13, 0x13, lambda m: gps.append(m.value), read=False)
        run_until_power_off(p, vp)
        assert reports == [0x89AB_CDEF, 0x0123_4567]
        assert log == [
            (0x40000000, False, 0),
            (0x40000001, True, 0x0000_CAFE_0000_F00D),
            (0x40000002, False, 0),
        ]
        # 0x40000002: the handler's #GP; 0x40000003: KVM does not know it, nobody intercepts: #GP
        assert gps == [0xEE, 0xEE]
        c = p.counters["msr"]
        assert (c["count"], c["defaulted"]) == (4, 1)


def test_a_read_only_msr_intercept_leaves_writes_to_kvm() -> None:
    with guest("msr") as (p, vp, _):
        log: list[bool] = []
        p.intercepts.install_msr(0x40000001, lambda m: log.append(m.is_write) or 0, write=False)
        run_until_power_off(p, vp)
        # WRMSR 0x40000001 went to KVM, which does not know it: a default #GP, not our handler
        assert log == []


@pytest.mark.kvm
def test_msrs_too_far_apart_for_the_kvm_filter_are_refused() -> None:
    with guest("msr") as (p, _vp, _):
        spread = [i * 0x10000 for i in range(9)]  # 9 ranges for read + 9 for write > 16
        with pytest.raises(InterceptError, match="filter ranges"):
            p.intercepts.install_msr(spread, lambda m: 0)
        assert p.intercepts.msr == {}  # nothing half-installed
