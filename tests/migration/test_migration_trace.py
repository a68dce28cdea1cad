"""A live migration watched through the flight recorder: the source worker streams each phase
change (connect, authenticate, config, the passes, final, state, commit, done) with the bytes
and pages sent so far, in order, to its owner while the owner asks for events."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from pyhv.migration.worker import migrate_worker
from pyhv.trace.events import Event, MigrationEvent
from tests.migration.conftest import TOKEN

pytestmark = pytest.mark.guest


def test_the_source_streams_every_migration_phase_in_order_with_bytes_and_pages(
    hosts: Any,
) -> None:
    src, _guest = hosts.boot()
    events: list[Event] = []
    done = threading.Event()

    def collect(batch: list[Event]) -> None:
        events.extend(batch)
        if any(isinstance(e, MigrationEvent) and e.phase == "done" for e in batch):
            done.set()

    src.trace_listeners.append(collect)
    src.trace(True)
    dst = hosts.destination()
    result = migrate_worker(src, dst.wait_listening(), TOKEN, {})
    assert done.wait(30), f"no 'done' phase among {len(events)} events"
    phases = [e for e in events if isinstance(e, MigrationEvent)]
    names = [e.phase for e in phases]
    assert names[:3] == ["connect", "authenticate", "config"]
    assert names[3] == "pass1" and names[-4:] == ["final", "state", "commit", "done"]
    assert all(e.role == "source" for e in phases)
    sent = [e.bytes for e in phases]
    assert sent == sorted(sent) and sent[-1] == result["bytes_sent"] > 0
    assert phases[-1].pages == result["pages_sent"]
