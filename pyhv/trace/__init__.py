"""The flight recorder: typed events of one VM (intercepts, VMBus packets, Dynamic Memory
messages, balancer decisions, migration phases), a bounded ring that keeps the latest of them,
and a file format to keep them in. Off by default: nothing records until a subscriber attaches.

A leaf of pyhv: it imports nothing of pyhv, so every layer may emit events into it."""

from pyhv.trace.events import KINDS, Event, TraceError, event_from_wire
from pyhv.trace.recorder import Recorder

__all__ = ["KINDS", "Event", "Recorder", "TraceError", "event_from_wire"]
