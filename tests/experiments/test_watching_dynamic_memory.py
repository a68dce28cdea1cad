"""The book's experiment "Watching Dynamic Memory" end to end with the reference guest under
KVM, at time scale 0.1 (trim after 18 s, add settle 3 s), judged by the counters' CSV."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pyhv.experiments.lab import PHYSICAL, VISIBLE
from pyhv.experiments.watch_dynamic_memory import VM, WatchConfig, run_watch
from tests.experiments.series import rises, series

pytestmark = pytest.mark.guest


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("watch")
    run_watch(
        WatchConfig(out=out, time_scale=0.1, rest_s=3, hold_s=3, after_s=4),
        say=lambda _: None,
    )
    result: dict[str, Any] = json.loads((out / "events.json").read_text())
    result["visible"] = series(out / "counters.csv", VM, VISIBLE)
    result["physical"] = series(out / "counters.csv", VM, PHYSICAL)
    result["out"] = out
    return result


def test_after_testlimit_guest_visible_and_physical_memory_jump_together(
    run: dict[str, Any],
) -> None:
    ev, physical, visible = run["events"], run["physical"], run["visible"]
    start = physical[0][1]
    jumps = rises(physical, ev["testlimit"], ev["kill"])
    assert jumps, physical
    t = jumps[0][0]
    at = dict(physical)[t]
    assert at > start
    assert dict(visible)[t] == at  # to the same value: the memory was hot-added


def test_a_second_jump_follows_when_the_first_addition_did_not_relieve_the_pressure(
    run: dict[str, Any],
) -> None:
    ev, physical, visible = run["events"], run["physical"], run["visible"]
    jumps = rises(physical, ev["testlimit"], ev["kill"])
    assert len(jumps) >= 2, physical
    assert rises(visible, ev["testlimit"], ev["kill"])[1][0] == jumps[1][0]
    second = dict(physical)[jumps[1][-1]]
    first = dict(physical)[jumps[0][-1]]
    assert second > first


def test_after_kill_the_levels_stay_then_physical_memory_is_trimmed_back(
    run: dict[str, Any],
) -> None:
    ev, physical = run["events"], run["physical"]
    start = physical[0][1]
    at_kill = [v for t, v in physical if t <= ev["kill"]][-1]
    after = [(t, v) for t, v in physical if t > ev["kill"]]
    falls = [t for (t, v), (_, before) in zip(after[1:], after, strict=False) if v < before]
    assert falls, after
    # unchanged from kill until the trim starts: removal is lazy
    assert all(v == at_kill for t, v in after if t < falls[0])
    assert len([t for t, _ in after if t < falls[0]]) >= 4
    # back near where it started (its minimum), and not given back afterwards
    low = next((i for i, (_, v) in enumerate(after) if v <= start + 2), None)
    assert low is not None, f"never trimmed back to {start} MiB: {after}"
    assert len(after) - low >= 4
    assert max(v for _, v in after[low:]) <= start + 2


def test_guest_visible_physical_memory_never_falls(run: dict[str, Any]) -> None:
    visible = [v for _, v in run["visible"]]
    assert visible[-1] > visible[0]
    assert all(b >= a for a, b in zip(visible, visible[1:], strict=False))


def test_the_chart_and_the_account_are_written(run: dict[str, Any]) -> None:
    out: Path = run["out"]
    assert (out / "watch-dynamic-memory.png").stat().st_size > 10_000
    account = (out / "account.txt").read_text()
    for step in ("first add", "second add", "kill", "trim starts", "trimmed"):
        assert step in account
    assert f"chart scale {3 * run['start_visible_mib']:g} MiB" in account
