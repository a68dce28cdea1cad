"""Reading an experiment's counter CSV as series, and finding jumps in them."""

from __future__ import annotations

from pathlib import Path

from pyhv.counters.csvlog import read_csv
from pyhv.experiments.lab import counter_path


def series(csv: str | Path, vm: str, counter: str) -> list[tuple[float, float]]:
    """(time, value) of one VM's counter, where the CSV has it."""
    path = counter_path(vm, counter)
    return [(s.time_s, s.values[path]) for s in read_csv(csv) if path in s.values]


def rises(points: list[tuple[float, float]], since: float, until: float) -> list[list[float]]:
    """Times of increases between `since` and `until`, grouped: increases in consecutive samples
    are one jump; a sample without change (a plateau) separates two jumps."""
    out: list[list[float]] = []
    last_rise = -1
    inside = [(i, t, v) for i, (t, v) in enumerate(points) if since <= t <= until and i > 0]
    for i, t, v in inside:
        if v > points[i - 1][1]:
            if out and last_rise == i - 1:
                out[-1].append(t)
            else:
                out.append([t])
            last_rise = i
    return out
