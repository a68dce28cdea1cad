"""The "Hyper-V VM Live Migration" counter set: one instance per migrating VM."""

from __future__ import annotations

from typing import Any

from pyhv.counters.registry import CounterDef, CounterRegistry, CounterSet, CounterSetDef

MIGRATION_SET = CounterSetDef(
    "Hyper-V VM Live Migration",
    (
        CounterDef("Passes", "memory passes done (the final one included)", "count", "cumulative"),
        CounterDef("Pages Sent", "guest pages sent with their contents", "pages", "cumulative"),
        CounterDef("Zero Pages", "pages sent as zero markers", "pages", "cumulative"),
        CounterDef("Bytes Sent", "bytes on the wire, frames and headers", "bytes", "cumulative"),
        CounterDef("Dirty Pages", "pages written since the last pass (left to send)", "pages"),
        CounterDef("Dirty Rate", "pages the guest dirtied per second in the last pass", "pages"),
        CounterDef("Bandwidth", "bytes per second of the last pass", "bytes"),
        CounterDef("Expected Downtime", "seconds the final pass would take now", "seconds"),
        CounterDef("Throttle", "percent of each interval the VPs are paused", "percent"),
        CounterDef("Downtime", "seconds from pause to running on the destination", "seconds"),
        CounterDef("Total Time", "seconds from connect to resumed", "seconds"),
        CounterDef(
            "Frames Refused",
            "frames refused as forged or corrupted (their tag did not match)",
            "count",
            "cumulative",
        ),
    ),
    instance_label="vm",
    prometheus_name="pyhv_live_migration",
)

_KEYS = {
    "Passes": "passes",
    "Pages Sent": "pages_sent",
    "Zero Pages": "zero_pages",
    "Bytes Sent": "bytes_sent",
    "Dirty Pages": "dirty_pages",
    "Dirty Rate": "dirty_rate",
    "Bandwidth": "bandwidth",
    "Expected Downtime": "expected_downtime",
    "Throttle": "throttle_percent",
    "Downtime": "downtime",
    "Total Time": "total_time",
    "Frames Refused": "frames_refused",
}


def register(registry: CounterRegistry) -> CounterSet:
    return registry.register(MIGRATION_SET)


def publish(counters: CounterSet, vm: str, progress: dict[str, Any]) -> None:
    """Copy a progress report (pyhv.migration.source.Progress.as_dict) into the set."""
    counters.update(
        {name: float(progress[key] or 0) for name, key in _KEYS.items() if key in progress}, vm
    )
