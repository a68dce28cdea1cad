"""The dirty limit's arithmetic (pyhv.migration.dirtylimit): a VP's debt in time, the credit of
one interval, the rate bound the tests hold the guest to, the option's values; and the limiter
driven by simulated harvests asks only the VP over the limit to sleep."""

from __future__ import annotations

from typing import Any

import pytest

from pyhv.migration import MigrationError
from pyhv.migration.dirtylimit import (
    INTERVAL,
    MIN_LIMIT,
    DirtyLimiter,
    auto_limit,
    next_free,
    parse_limit,
    rate_bound,
)


@pytest.mark.unit
def test_a_vp_owes_its_pages_over_the_limit_in_time_with_one_interval_credited() -> None:
    # 1000 pages/s: 30 pages cost 30 ms; a VP idle for long gets one interval (10 ms) of credit
    assert next_free(0.0, 30, 1000, now=5.0, credit=0.01) == pytest.approx(5.02)
    # debt accumulates while it is still owed
    assert next_free(5.02, 30, 1000, now=5.0, credit=0.01) == pytest.approx(5.05)
    # within its share it owes nothing: free before now
    assert next_free(0.0, 5, 1000, now=5.0, credit=0.01) < 5.0


@pytest.mark.unit
def test_harvests_held_to_the_limit_stay_within_the_bound_over_every_window() -> None:
    # a VP that would write 20 000 pages/s, harvested every interval, sleeping as asked
    limit, fast, window = 2000, 20_000, 1.0
    t, free, log = 0.0, 0.0, []
    while t < 10.0:
        runs = max(0.0, t + INTERVAL - max(free, t))  # the part of this interval it ran
        pages = int(fast * runs)
        t += INTERVAL
        if pages:
            free = next_free(free, pages, limit, t, INTERVAL)
        log.append((t, pages))
    most = max(p for _, p in log)
    for end in [x / 10 for x in range(10, 100)]:
        n = sum(p for at, p in log if end - window < at <= end)
        assert n / window <= rate_bound(limit, most, window)
    total = sum(p for _, p in log)
    assert total <= limit * (10.0 + INTERVAL) + most
    assert total >= 0.9 * limit * 10.0  # and it is not held below the limit


@pytest.mark.unit
def test_the_option_takes_pages_per_second_or_auto() -> None:
    assert parse_limit(None) is None and parse_limit(0) is None
    assert parse_limit(2000) == 2000 and parse_limit("3000") == 3000
    assert parse_limit("auto") == "auto"
    for bad in (-1, 10, True, 2.5, "fast"):
        with pytest.raises(MigrationError, match="pages per second each VP may dirty"):
            parse_limit(bad)
    # auto: a quarter of 100 MB/s shared by 2 VPs, in pages
    assert auto_limit(100e6, 2) == int(0.25 * 100e6 / 4096 / 2)
    assert auto_limit(1.0, 4) == MIN_LIMIT


class _Vp:
    def __init__(self) -> None:
        self.asked: list[float] = []
        self.throttled_seconds = 0.0

    def throttle(self, until: float) -> None:
        self.asked.append(until)


class _Partition:
    name = "sim"

    def __init__(self) -> None:
        self.vps: dict[int, Any] = {0: _Vp(), 1: _Vp()}
        self.dirty_rings = type("Rings", (), {"listeners": [], "full_exits": {}, "overflows": 0})()


@pytest.mark.simulation
def test_only_the_vp_over_the_limit_is_asked_to_sleep_and_rates_are_per_vp() -> None:
    p = _Partition()
    lim = DirtyLimiter(p, limit=1000)  # type: ignore[arg-type]
    lim.started = 100.0
    for i in range(100):  # one second: VP 0 writes 3 pages a harvest, VP 1 50
        lim._on_harvest({0: 3, 1: 50}, 100.0 + (i + 1) * INTERVAL)
    assert p.vps[0].asked == []  # 300 pages/s: under 1000, never asked
    assert len(p.vps[1].asked) == 100  # 5000 pages/s: asked after every harvest
    assert p.vps[1].asked[-1] == pytest.approx(105.0)  # 5000 pages at 1000/s from 100.0
    rates = lim.rates(now=101.0)
    assert rates[0] == pytest.approx(300, rel=0.02) and rates[1] == pytest.approx(5000, rel=0.02)
    assert lim.report()["vp_dirty_pages"] == [300, 5000]


@pytest.mark.simulation
def test_a_limit_on_a_vm_without_the_ring_is_refused_naming_the_remedy() -> None:
    p = _Partition()
    p.dirty_rings = None  # type: ignore[assignment]
    with pytest.raises(MigrationError, match="dirty_ring_entries"):
        DirtyLimiter(p, limit=1000)  # type: ignore[arg-type]
