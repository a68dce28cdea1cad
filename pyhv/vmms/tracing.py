"""The VMMS's side of the flight recorder: who watches which VM's events.

While at least one client watches a VM (`attach`), its worker streams the VM's events
(``{"op": "trace", "on": true}``); when the last one leaves, the worker stops and its event
sources are off again. The balancer's decisions are made here, in the VMMS, so they join the
stream of each watched VM here (`decision`). A client's `out` is called with each batch of
events on the worker's reader thread (it must not block: the API hands them to a bounded
queue) and with None when the VM's worker ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from pyhv.dynmem.balancer import Add, Decision, Remove, VmMemoryState
from pyhv.trace.events import BalancerEvent, Event

Out = Callable[[list[Event] | None], object]


class TracingUnavailable(RuntimeError):
    """The VM's worker cannot stream events (an in-process VM)."""


class TraceHub:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outs: dict[str, list[Out]] = {}
        self._workers: dict[str, tuple[Any, Callable[[list[Event]], None]]] = {}

    def attach(self, name: str, worker: Any, out: Out) -> Callable[[], None]:
        """Start sending VM `name`'s events to `out`; returns the call that stops it."""
        if not hasattr(worker, "trace"):
            raise TracingUnavailable(
                f"VM {name!r} runs in the VMMS's own process, whose events are not streamed: "
                "run it in a worker process"
            )
        with self._lock:
            outs = self._outs.setdefault(name, [])
            outs.append(out)
            if name not in self._workers:

                def fan(events: list[Event]) -> None:
                    for o in list(self._outs.get(name, ())):
                        o(events)

                self._workers[name] = (worker, fan)
                worker.trace_listeners.append(fan)
                worker.trace(True)

        def detach() -> None:
            with self._lock:
                outs = self._outs.get(name, [])
                if out in outs:
                    outs.remove(out)
                if not outs:
                    self._stop(name)

        return detach

    def _stop(self, name: str) -> None:
        self._outs.pop(name, None)
        held = self._workers.pop(name, None)
        if held is not None:
            worker, fan = held
            if fan in worker.trace_listeners:
                worker.trace_listeners.remove(fan)
            worker.trace(False)

    def watched(self, name: str) -> bool:
        return bool(self._outs.get(name))

    def decision(self, decision: Decision, states: list[VmMemoryState]) -> None:
        """A balancer tick: one BalancerEvent for every watched VM it looked at."""
        if not self._outs:
            return
        now = time.time()
        for i, name in enumerate(decision.vm_ids):
            if not self.watched(name):
                continue
            op = decision.operation_for(name)
            action = (
                "add" if isinstance(op, Add) else "remove" if isinstance(op, Remove) else "none"
            )
            target = decision.target_pages[i]
            event = BalancerEvent(
                now,
                -1,
                action,
                0 if op is None else op.pages,
                round(decision.pressure[i]),
                states[i].assigned_pages,
                target,
            )
            for o in list(self._outs.get(name, ())):
                o([event])

    def end(self, name: str) -> None:
        """VM `name`'s worker ended: every stream of it ends."""
        with self._lock:
            outs = self._outs.pop(name, [])
            self._workers.pop(name, None)
        for o in outs:
            o(None)
