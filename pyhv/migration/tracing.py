"""Migration phases for the VM's flight recorder (pyhv.trace), recorded only while someone
watches the VM (`pyhv vm trace NAME --only migration`)."""

from __future__ import annotations

import time
from typing import Any

from pyhv.trace.events import MigrationEvent


def trace_phase(vm: Any, role: str, phase: str, sent_or_received: int, pages: int) -> None:
    recorder = getattr(vm, "recorder", None)
    if recorder is not None and recorder.active:
        recorder.record(MigrationEvent(time.time(), -1, role, phase, sent_or_received, pages))
