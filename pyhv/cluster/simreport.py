"""The fleet simulator's report: the policies side by side as a table (text), a CSV (one row
per policy) and a PNG (memory assigned, VMs under pressure and migrations over the simulated
day, one line per policy)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from pyhv.cluster.simulator import SimResult

_COLUMNS = (
    ("policy", "policy", "{}"),
    ("saved_gib", "saved GiB", "{:.1f}"),
    ("saved_percent", "saved %", "{:.1f}"),
    ("vm_seconds_under_pressure", "VM-s under pressure", "{:.0f}"),
    ("host_seconds_short", "host-s short", "{:.0f}"),
    ("migrations_per_hour", "migrations/h", "{:.2f}"),
    ("gib_moved", "GiB moved", "{:.1f}"),
    ("vm_hours_per_s", "VM-h/s", "{:.0f}"),
)


def table(results: Sequence[SimResult]) -> str:
    """The policies side by side, with the fleet in a heading line."""
    if not results:
        return "no policy simulated\n"
    r0 = results[0]
    head = (
        f"{r0.hosts} hosts x {r0.host_memory / 2**30:.0f} GiB, {r0.vms} VMs "
        f"({r0.unplaced} fit nowhere), {r0.hours:g} h simulated; static allocation "
        f"{r0.static_bytes / 2**30:.0f} GiB\n"
    )
    rows = [[label for _, label, _ in _COLUMNS]]
    for r in results:
        s = r.summary()
        rows.append([fmt.format(s[key]) for key, _, fmt in _COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return head + "\n".join(lines) + "\n"


def write_csv(results: Sequence[SimResult], path: Path) -> None:
    with open(path, "w", newline="") as f:
        rows = [r.summary() for r in results]
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["policy"])
        w.writeheader()
        w.writerows(rows)


def write_png(results: Sequence[SimResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    for r in results:
        s = r.series
        axes[0].plot(s["hour"], s["assigned_gib"], label=r.policy)
        axes[1].plot(s["hour"], s["vms_under_pressure"], label=r.policy)
        axes[2].plot(s["hour"], s["migrations"], label=r.policy)
    if results:
        axes[0].axhline(results[0].static_bytes / 2**30, color="grey", ls="--", label="static")
    axes[0].set_ylabel("assigned GiB")
    axes[1].set_ylabel("VMs under pressure")
    axes[2].set_ylabel("migrations (total)")
    axes[2].set_xlabel("simulated hours")
    axes[0].legend(loc="best", fontsize="small")
    r0 = results[0] if results else None
    if r0 is not None:
        fig.suptitle(f"pyhv cluster simulate: {r0.hosts} hosts, {r0.vms} VMs, {r0.hours:g} h")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
