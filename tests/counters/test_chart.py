"""Perfmon-style charts written to PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyhv.counters import Sample
from pyhv.counters.chart import draw_chart

pytestmark = pytest.mark.unit

VISIBLE = "\\Hyper-V Dynamic Memory VM(testvm)\\Guest Visible Physical Memory"
PHYSICAL = "\\Hyper-V Dynamic Memory VM(testvm)\\Physical Memory"


def pixels_of(png: Path, color: str) -> int:
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    want = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(rgb - want).sum(axis=2) <= 30).sum())


def test_a_chart_of_visible_and_physical_memory_draws_each_series_in_its_colour(
    tmp_path: Path,
) -> None:
    # Visible memory only grows; physical memory follows the balloon (they differ from t=40).
    samples = [
        Sample(
            float(t),
            {
                VISIBLE: 512.0 if t < 10 else 1024.0,
                PHYSICAL: 512.0 if t < 10 else (1024.0 if t < 40 else 600.0),
            },
        )
        for t in range(120)
    ]
    png = tmp_path / "dm.png"
    colors = draw_chart(
        samples, [VISIBLE, PHYSICAL], png, title="Watching Dynamic Memory", y_max=3 * 512
    )
    assert png.stat().st_size > 5_000
    with Image.open(png) as im:
        assert im.size == (1000, 500)
    for color in colors.values():
        assert pixels_of(png, color) > 200
    # A colour no series uses is (nearly) absent: the count above measures the series.
    assert pixels_of(png, "#00a000") < 20


def test_a_chart_without_counters_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one counter"):
        draw_chart([], [], tmp_path / "x.png")


def test_a_counter_log_is_charted_from_the_command_line(tmp_path: Path) -> None:
    from pyhv.counters import CounterDef, CounterRegistry, CounterSetDef, CsvLog
    from pyhv.counters.chart import main

    registry = CounterRegistry()
    s = registry.register(CounterSetDef("Set", (CounterDef("Value", "v"),), None))
    log = CsvLog(tmp_path / "log.csv", registry)
    for t in range(30):
        s.set("Value", t % 7)
        log.sample(float(t))
    main([str(tmp_path / "log.csv"), str(tmp_path / "out.png"), "--counter", "\\Set\\Value"])
    assert pixels_of(tmp_path / "out.png", "#ff0000") > 100
    with pytest.raises(SystemExit):
        main([str(tmp_path / "log.csv"), str(tmp_path / "x.png"), "--counter", "\\Set\\Nope"])
