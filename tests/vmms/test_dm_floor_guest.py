"""A guest at its floor is asked once (issue 14, item 5), with reference guests under an
in-process VMMS on a short host: the high-weight VM commits more than the pool holds, memory is
taken back from the low-weight idle VM down to its floor; its guest gives what it can and keeps
the rest; the balancer then asks it nothing more (the guest's balloon requests are counted)
until its status changes."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from pyhv.dynmem.balancer import BalancerConfig
from pyhv.experiments.lab import Lab
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

TICKS = 10  # balancer decisions watched after the floor was reached


def _balloon_requests(console: object) -> int:
    out = console.run("dm").decode(errors="replace")  # type: ignore[attr-defined]
    return int(re.search(r"balloon-requests: (\d+)", out).group(1))  # type: ignore[union-attr]


def test_a_guest_at_its_floor_is_asked_once_until_its_status_changes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pyhv.vmms.balancing")
    ticks: list[object] = []
    with Lab(tmp_path, budget_mib=1024, balancer=BalancerConfig()) as lab:
        lab.create("low", memory="512M", minimum="128M", maximum="512M", weight=10)
        lab.create("high", memory="256M", minimum="128M", maximum="1024M", weight=90)
        low, high = lab.start("low"), lab.start("high")
        lab.vmms.balancer.decision_listeners.append(lambda d, _s: ticks.append(d))
        lab.begin()
        for name, c in (("low", low), ("high", high)):
            c.wait_prompt()
            lab.wait_reporting(name)
        # the low-weight VM's memory is its workload's: it can give little of it back
        low.run("testlimit -m 300 -c 1", b"committed")
        lab.wait_stable("low", 2.0, 60, "the low-weight VM settled")
        high.run("testlimit -m 600 -c 1", b"committed")

        def floors() -> int:
            return sum("low stopped at its floor" in r.getMessage() for r in caplog.records)

        assert wait_for(floors, 60, "the low-weight VM answered a removal short (at its floor)")
        seen = len(ticks)
        assert wait_for(lambda: len(ticks) >= seen + 3, 60, "three more decisions")
        asked = _balloon_requests(low)
        seen = len(ticks)
        assert wait_for(lambda: len(ticks) >= seen + TICKS, 60, f"{TICKS} more decisions")
        # the host is still short and the guest's status the same: it was not asked again
        assert _balloon_requests(low) == asked
        assert lab.vmms.memory_status("high")["assigned"] < 1024 << 20
        # it stopped at its floor once or twice in all (once per status it reported), not
        # every tick
        assert floors() <= 3, floors()
