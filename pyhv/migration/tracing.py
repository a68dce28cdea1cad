"""Migration phases for the VM's flight recorder (pyhv.trace), recorded only while someone
watches the VM (`pyhv vm trace NAME --only migration`)."""

from __future__ import annotations

import time
from typing import Any

from pyhv.trace.events import DirtyRateEvent, MigrationEvent


def trace_phase(vm: Any, role: str, phase: str, sent_or_received: int, pages: int) -> None:
    recorder = getattr(vm, "recorder", None)
    if recorder is not None and recorder.active:
        recorder.record(MigrationEvent(time.time(), -1, role, phase, sent_or_received, pages))


def trace_dirty_rates(vm: Any, rates: list[float], limit: int, slept_ms: list[float]) -> None:
    """Each VP's dirty rate (pages/s over the last second), the limit, its sleep so far."""
    recorder = getattr(vm, "recorder", None)
    if recorder is not None and recorder.active:
        t = time.time()
        for vp, (rate, ms) in enumerate(zip(rates, slept_ms, strict=False)):
            recorder.record(DirtyRateEvent(t, vp, float(rate), limit, float(ms)))
