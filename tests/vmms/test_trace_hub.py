"""The VMMS's side of the flight recorder (pyhv.vmms.tracing), with a stand-in worker: the
worker streams only while someone watches and only the kinds someone asked for; each watcher
gets its own kinds; the balancer's decisions join the stream of each watched VM; the VM's end
ends every stream."""

from __future__ import annotations

from typing import Any

import pytest

from pyhv.dynmem.balancer import (
    HostMemory,
    MemorySettings,
    StatusReport,
    VmMemoryState,
    decide,
    pages_from_mib,
)
from pyhv.trace.events import DmEvent, Event, IoEvent
from pyhv.vmms.tracing import TraceHub, TracingUnavailable

pytestmark = pytest.mark.simulation

MIB = pages_from_mib(1)


class FakeWorker:
    """What TraceHub uses of a WorkerProcess: trace(on, kinds) and trace_listeners."""

    def __init__(self) -> None:
        self.trace_listeners: list[Any] = []
        self.calls: list[tuple[bool, frozenset[str] | None]] = []

    def trace(self, on: bool, kinds: Any = None) -> None:
        self.calls.append((on, None if kinds is None else frozenset(kinds)))

    def emit(self, events: list[Event]) -> None:
        for listener in list(self.trace_listeners):
            listener(events)


IO = IoEvent(1.0, 0, 0x3F8, "out", 1, 1, 0x41, 900)
DM = DmEvent(1.1, -1, "guest->host", "STATUS_REPORT", 3, {"num_committed": 7}, [])


def test_the_worker_streams_the_union_of_the_kinds_watched_and_stops_with_the_last_watcher() -> (
    None
):
    hub, worker = TraceHub(), FakeWorker()
    dm_only: list[Any] = []
    everything: list[Any] = []
    stop_dm = hub.attach("vm1", worker, dm_only.append, frozenset({"dm"}))
    assert worker.calls == [(True, frozenset({"dm"}))]
    stop_all = hub.attach("vm1", worker, everything.append, None)
    assert worker.calls[-1] == (True, None)
    worker.emit([IO, DM])
    assert dm_only == [[DM]] and everything == [[IO, DM]]
    stop_all()
    assert worker.calls[-1] == (True, frozenset({"dm"}))  # back to what is still watched
    stop_dm()
    assert worker.calls[-1] == (False, None) and worker.trace_listeners == []
    worker.emit([IO, DM])
    assert dm_only == [[DM]]  # nothing after leaving


def test_balancer_decisions_reach_only_the_watchers_of_that_vm_who_asked_for_them() -> None:
    hub, worker = TraceHub(), FakeWorker()
    seen: list[Any] = []
    dm_only: list[Any] = []
    hub.attach("hungry", worker, seen.append, frozenset({"balancer"}))
    hub.attach("hungry", worker, dm_only.append, frozenset({"dm"}))
    settings = MemorySettings.from_mib(512, 256, 4096, 20, 50)
    states = [
        VmMemoryState("hungry", settings, 512 * MIB, 512 * MIB, report=StatusReport(900 * MIB, 0)),
        VmMemoryState("idle", settings, 512 * MIB, 512 * MIB, report=StatusReport(300 * MIB, 0)),
    ]
    decision = decide(HostMemory(8192 * MIB), states)
    hub.decision(decision, states)
    assert dm_only == []
    [[event]] = seen
    assert event.kind == "balancer" and event.action == "add"
    assert event.pressure == round(900 / 512 * 100) and event.assigned == 512 * MIB
    assert event.pages > 0 and event.target > event.assigned


def test_the_end_of_the_vm_ends_every_stream_and_an_in_process_vm_cannot_be_traced() -> None:
    hub, worker = TraceHub(), FakeWorker()
    got: list[Any] = []
    hub.attach("vm1", worker, got.append)
    hub.end("vm1")
    assert got == [None] and not hub.watched("vm1")
    with pytest.raises(TracingUnavailable, match="run it in a worker process"):
        hub.attach("vm2", object(), got.append)
