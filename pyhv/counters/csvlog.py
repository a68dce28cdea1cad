"""Counter logs as CSV, like a Perfmon data collector set: one row per sample, a column per
counter instance (its Perfmon path), the first column the sample time in seconds."""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from pyhv.counters.registry import CounterRegistry

TIME_COLUMN = "Time (s)"


@dataclass(frozen=True, slots=True)
class Sample:
    """One row: when, and the value of each counter instance present then."""

    time_s: float
    values: dict[str, float]


class CsvLog:
    """Appends a row per `sample()`. `columns` limits the log to those paths (in that order);
    by default every counter instance is logged, and a counter that appears later (a new VM)
    gets a new column: the file is rewritten with the wider header, older rows left blank."""

    def __init__(
        self,
        path: str | Path,
        registry: CounterRegistry,
        columns: Iterable[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = Path(path)
        self._registry = registry
        self._fixed = list(columns) if columns is not None else None
        self._columns: list[str] = list(self._fixed or [])
        self._clock = clock
        self._start = clock()
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerow([TIME_COLUMN, *self._columns])

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    def sample(self, time_s: float | None = None) -> Sample:
        """Take a snapshot and append it; `time_s` defaults to seconds since the log started."""
        t = self._clock() - self._start if time_s is None else time_s
        values = self._registry.snapshot()
        if self._fixed is None:
            new = [p for p in values if p not in self._columns]
            if new:
                self._widen(new)
        else:
            values = {p: v for p, v in values.items() if p in self._fixed}
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(t), *(_fmt(values.get(c)) for c in self._columns)])
        return Sample(t, values)

    def _widen(self, new: list[str]) -> None:
        old = read_csv(self.path)
        self._columns.extend(new)
        with self.path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow([TIME_COLUMN, *self._columns])
            for s in old:
                w.writerow([_fmt(s.time_s), *(_fmt(s.values.get(c)) for c in self._columns)])


def _fmt(value: float | None) -> str:
    if value is None:
        return ""
    # repr round-trips floats exactly; integral values print without ".0" for readability.
    return str(int(value)) if math.isfinite(value) and value == int(value) else repr(value)


def read_csv(path: str | Path) -> list[Sample]:
    """Read a log written by CsvLog back (blank cells are absent from `values`)."""
    with Path(path).open(newline="") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0] != TIME_COLUMN:
        raise ValueError(
            f"{path}: not a counter log (the first header cell must be {TIME_COLUMN!r})"
        )
    header = rows[0][1:]
    samples = []
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header) + 1:
            raise ValueError(f"{path}:{n}: {len(row)} cells, the header has {len(header) + 1}")
        values = {c: float(v) for c, v in zip(header, row[1:], strict=True) if v != ""}
        samples.append(Sample(float(row[0]), values))
    return samples
