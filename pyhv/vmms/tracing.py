"""The VMMS's side of the flight recorder: who watches which VM's events.

While at least one client watches a VM (`attach`), its worker streams the VM's events of the
kinds some client asked for (``{"op": "trace", "on": true, "kinds": [...]}``: only those
sources are on); when the last one leaves, the worker stops and its event sources are off
again. Each client gets only the kinds it asked for. The balancer's decisions are made here, in the VMMS, so they join the
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
        self._kinds: dict[int, frozenset[str] | None] = {}  # id(out) -> kinds (None: all)
        self._workers: dict[str, tuple[Any, Callable[[list[Event]], None]]] = {}

    def _union(self, name: str) -> frozenset[str] | None:
        kinds: set[str] = set()
        for o in self._outs.get(name, ()):
            k = self._kinds.get(id(o))
            if k is None:
                return None
            kinds |= k
        return frozenset(kinds)

    def attach(
        self, name: str, worker: Any, out: Out, kinds: frozenset[str] | None = None
    ) -> Callable[[], None]:
        """Start sending VM `name`'s events of `kinds` (None: all) to `out`; returns the call
        that stops it."""
        if not hasattr(worker, "trace"):
            raise TracingUnavailable(
                f"VM {name!r} runs in the VMMS's own process, whose events are not streamed: "
                "run it in a worker process"
            )
        with self._lock:
            before = self._union(name) if name in self._workers else frozenset()
            self._outs.setdefault(name, []).append(out)
            self._kinds[id(out)] = kinds
            if name not in self._workers:

                def fan(events: list[Event]) -> None:
                    for o in list(self._outs.get(name, ())):
                        k = self._kinds.get(id(o))
                        mine = events if k is None else [e for e in events if e.kind in k]
                        if mine:
                            o(mine)

                self._workers[name] = (worker, fan)
                worker.trace_listeners.append(fan)
            union = self._union(name)
            if union != before:
                worker.trace(True, union)

        def detach() -> None:
            with self._lock:
                outs = self._outs.get(name, [])
                if out in outs:
                    outs.remove(out)
                    self._kinds.pop(id(out), None)
                if not outs:
                    self._stop(name)
                elif name in self._workers:
                    self._workers[name][0].trace(True, self._union(name))

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
                k = self._kinds.get(id(o))
                if k is None or "balancer" in k:
                    o([event])

    def end(self, name: str) -> None:
        """VM `name`'s worker ended: every stream of it ends."""
        with self._lock:
            outs = self._outs.pop(name, [])
            self._workers.pop(name, None)
            for o in outs:
                self._kinds.pop(id(o), None)
        for o in outs:
            o(None)
