"""Perfmon-style line charts of counters over time, written to PNG (matplotlib, Agg backend:
no display needed)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot: charts are files, never windows

import matplotlib.pyplot as plt  # noqa: E402

from pyhv.counters.csvlog import Sample, read_csv  # noqa: E402

# Perfmon-like: saturated, distinct colours on white, in the order series are added.
PALETTE = ("#ff0000", "#0000ff", "#00a000", "#ff00ff", "#00a0a0", "#a0a000", "#000000", "#ff8000")


def draw_chart(
    samples: Sequence[Sample],
    counters: Sequence[str],
    png: str | Path,
    *,
    title: str = "",
    y_max: float | None = None,
    y_label: str = "",
    colors: Sequence[str] = PALETTE,
    size: tuple[float, float] = (10.0, 5.0),
    dpi: int = 100,
) -> dict[str, str]:
    """Draw `counters` (Perfmon paths) from `samples` against time into `png`. A counter
    missing from a sample leaves a gap. `y_max` fixes the vertical scale (the book's experiment
    sets it to three times Guest Visible Physical Memory). Returns counter -> colour."""
    if not counters:
        raise ValueError("draw_chart needs at least one counter path to draw")
    if len(counters) > len(colors):
        raise ValueError(f"{len(counters)} counters but only {len(colors)} colours: pass more")
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    try:
        ax.set_facecolor("white")
        ax.grid(True, color="#d0d0d0", linewidth=0.8)
        times = [s.time_s for s in samples]
        used: dict[str, str] = {}
        for counter, color in zip(counters, colors, strict=False):
            values = [s.values.get(counter, float("nan")) for s in samples]
            ax.plot(times, values, color=color, linewidth=2.0, label=counter, antialiased=False)
            used[counter] = color
        ax.set_xlabel("time (s)")
        if y_label:
            ax.set_ylabel(y_label)
        if y_max is not None:
            ax.set_ylim(0, y_max)
        else:
            ax.set_ylim(bottom=0)
        if title:
            ax.set_title(title)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=1, fontsize="small")
        fig.tight_layout()
        fig.savefig(png, dpi=dpi, facecolor="white")
    finally:
        plt.close(fig)
    return used


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m pyhv.counters.chart LOG.csv OUT.png [--counter PATH]... [--y-max N]`:
    chart a CsvLog (every column when no --counter is given)."""
    parser = argparse.ArgumentParser(prog="python -m pyhv.counters.chart", description=main.__doc__)
    parser.add_argument("log", type=Path, help="a counter log written by CsvLog")
    parser.add_argument("png", type=Path, help="the chart to write")
    parser.add_argument("--counter", action="append", default=[], help="a Perfmon path to draw")
    parser.add_argument("--y-max", type=float, default=None, help="top of the vertical scale")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    samples = read_csv(args.log)
    counters = args.counter or sorted({path for s in samples for path in s.values})
    missing = [c for c in counters if not any(c in s.values for s in samples)]
    if missing:
        parser.error(f"{args.log} has no column {missing[0]!r}")
    draw_chart(samples, counters, args.png, title=args.title, y_max=args.y_max)


if __name__ == "__main__":
    main()
