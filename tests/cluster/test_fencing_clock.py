"""The lease clock a host fences by: it stops its VMs a margin before the earliest moment etcd
may expire its lease, counted from when the last answered renewal was sent."""

from __future__ import annotations

import pytest

from pyhv.cluster.fencing import FencingError, LeaseClock

pytestmark = pytest.mark.unit


def test_the_host_fences_a_margin_before_the_lease_can_expire() -> None:
    clock = LeaseClock(ttl_s=5, margin_s=2)
    assert clock.fence_at is None and not clock.must_fence(1e9)  # not joined yet
    clock.renewed(sent_at=100.0, granted_s=5)
    assert clock.expires_at == 105.0 and clock.fence_at == 103.0
    assert not clock.must_fence(102.9) and clock.must_fence(103.0)
    clock.renewed(sent_at=101.0, granted_s=5)
    assert clock.fence_at == 104.0
    # An answer to an older renewal, arriving late, does not move the deadline back out.
    clock.renewed(sent_at=100.5, granted_s=5)
    assert clock.fence_at == 104.0
    assert clock.renew_every_s == 1.0  # three renewals fit between the last one and the fence


def test_a_margin_that_leaves_no_time_to_renew_is_refused() -> None:
    with pytest.raises(FencingError, match="must exceed the fencing margin"):
        LeaseClock(ttl_s=2, margin_s=2)
