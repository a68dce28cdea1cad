"""Workload traces for the fleet simulator: each VM's committed memory over time, and the
Dynamic Memory settings it runs with.

- `synthetic(n, seed)`: diurnal VMs (a daily sine per VM, its phase one of a few regions, so
  hosts whose VMs share a region peak together) and bursty VMs (a base load with bursts arriving
  at random, each lasting minutes to an hour), with a seed: the same seed gives the same fleet.
- `from_csv(path)`: a trace of real VMs, rows `time_s,vm,committed_bytes` (a header line is
  allowed); each VM holds its last value until its next row.

Sizes in bytes; `committed(t)` returns one column for all VMs (numpy, so 10 000 VMs cost
microseconds per step).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

GIB = 1 << 30
MIB = 1 << 20
DAY_S = 86_400.0
_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the line and the fix."""


@dataclass(frozen=True, eq=False)
class Fleet:
    """VMs' settings (bytes) and a source of their committed memory."""

    vm_ids: tuple[str, ...]
    startup: _I64
    minimum: _I64
    maximum: _I64
    dirty_bytes_per_s: _F64

    def committed(self, t: float) -> _I64:
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class SyntheticFleet(Fleet):
    base: _F64
    amplitude: _F64
    phase: _F64
    burst_start: _F64  # (VM, k) burst start times, inf where none
    burst_end: _F64
    burst_height: _F64
    noise: _F64
    seed: int

    def committed(self, t: float) -> _I64:
        day = self.base + self.amplitude * 0.5 * (1.0 + np.sin(2 * np.pi * t / DAY_S + self.phase))
        active = (self.burst_start <= t) & (t < self.burst_end)
        burst = (self.burst_height * active).sum(axis=1)
        # A little noise per step (deterministic in t, so policies see the same trace).
        wobble = self.noise * np.sin(t / 617.0 + self.phase * 7.0)
        value = np.clip(day + burst + wobble, 64 * MIB, self.maximum * 0.9)
        return value.astype(np.int64)


def synthetic(n: int, seed: int = 1, hours: float = 24.0, regions: int = 3) -> SyntheticFleet:
    """`n` VMs, 30 % of them bursty; maximum 2, 4 or 8 GiB; minimum a quarter and startup half
    of it; dirty rates from a few MiB/s to a few hundred."""
    if n < 1:
        raise ValueError(f"a fleet needs at least one VM, got {n}")
    rng = np.random.default_rng(seed)
    # Mostly small VMs, and a few large ones (databases) whose daily swing alone can make a
    # host short when two of one region share it.
    maximum = rng.choice(np.array([2, 4, 8, 32]) * GIB, size=n, p=[0.45, 0.32, 0.2, 0.03]).astype(
        np.int64
    )
    bursty = rng.random(n) < 0.3
    base = maximum * rng.uniform(0.15, 0.35, n)
    amplitude = np.where(bursty, maximum * 0.05, maximum * rng.uniform(0.15, 0.5, n))
    phase = rng.integers(0, regions, n) * (2 * np.pi / regions) + rng.normal(0, 0.2, n)
    k = 12
    rate_s = 3 * 3600.0  # a burst every three hours on average
    gaps = rng.exponential(rate_s, (n, k))
    start = np.cumsum(gaps, axis=1)
    start[~bursty] = np.inf
    start[start > hours * 3600.0] = np.inf
    end = start + rng.exponential(1200.0, (n, k)) + 300.0
    height = maximum[:, None] * rng.uniform(0.2, 0.45, (n, k))
    dirty = np.exp(rng.normal(np.log(8 * MIB), 1.5, n))
    return SyntheticFleet(
        vm_ids=tuple(f"vm{i:05d}" for i in range(n)),
        startup=maximum // 2,
        minimum=maximum // 4,
        maximum=maximum,
        dirty_bytes_per_s=dirty,
        base=base,
        amplitude=amplitude,
        phase=phase,
        burst_start=start,
        burst_end=end,
        burst_height=height,
        noise=(maximum * 0.01).astype(np.float64),
        seed=seed,
    )


@dataclass(frozen=True, eq=False)
class TraceFleet(Fleet):
    times: list[_F64]
    values: list[_I64]

    def committed(self, t: float) -> _I64:
        out = np.empty(len(self.vm_ids), dtype=np.int64)
        for i, (ts, vs) in enumerate(zip(self.times, self.values, strict=True)):
            j = int(np.searchsorted(ts, t, side="right")) - 1
            out[i] = vs[max(j, 0)]
        return out


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def from_csv(path: Path) -> TraceFleet:
    """A trace file of rows `time_s,vm,committed_bytes`; each VM's maximum is twice its peak
    (in 256 MiB steps), its minimum a quarter and startup half of that."""
    rows: dict[str, list[tuple[float, int]]] = {}
    try:
        with open(path, newline="") as f:
            for n, row in enumerate(csv.reader(f), 1):
                if not row or row[0].startswith("#"):
                    continue
                if n == 1 and not row[0].replace(".", "", 1).isdigit():
                    continue  # a header
                if len(row) != 3:
                    raise TraceError(
                        f"{path}:{n}: {len(row)} fields, expected time_s,vm,committed_bytes"
                    )
                try:
                    t, vm, value = float(row[0]), row[1].strip(), int(float(row[2]))
                except ValueError:
                    raise TraceError(
                        f"{path}:{n}: {row!r} is not time_s (seconds), vm, committed_bytes"
                    ) from None
                if value < 0 or t < 0 or not vm:
                    raise TraceError(f"{path}:{n}: negative time or memory, or no VM name")
                rows.setdefault(vm, []).append((t, value))
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e}") from None
    if not rows:
        raise TraceError(f"trace {path} has no rows: give lines time_s,vm,committed_bytes")
    ids = tuple(sorted(rows))
    times, values, maximum = [], [], []
    for vm in ids:
        pts = sorted(rows[vm])
        times.append(np.array([p[0] for p in pts], dtype=np.float64))
        values.append(np.array([p[1] for p in pts], dtype=np.int64))
        maximum.append(_round_up(max(2 * max(p[1] for p in pts), 512 * MIB), 256 * MIB))
    mx = np.array(maximum, dtype=np.int64)
    return TraceFleet(
        vm_ids=ids,
        startup=_round_up_array(mx // 2),
        minimum=_round_up_array(mx // 4),
        maximum=mx,
        dirty_bytes_per_s=np.full(len(ids), 8.0 * MIB),
        times=times,
        values=values,
    )


def _round_up_array(a: _I64) -> _I64:
    return (-(-a // MIB) * MIB).astype(np.int64)
