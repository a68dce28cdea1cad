"""Test-only fault injection: a plan of {phase: action} that each side consults at its phase
points, so tests can break a migration at every phase and check that it aborts cleanly.

Source phases: ``connect``, ``config``, ``pass1`` (after the first frame of memory),
``pass2``, ``prepare`` (the passes done, before PREPARE: the VM still runs), ``final`` (VPs
paused, before the last pages), ``state``, ``commit``, ``resumed``
(COMMIT sent, before RESUMED is read: the window a VMMS must close by asking the destination).
Destination phases: ``authenticate``, ``config``, ``build`` (READY sent, its VPs and devices
being built while pass 1 comes; not with Dynamic Memory, whose READY follows the build),
``memory`` (first page frame received),
``prepare`` (PREPARE received, before answering it), ``state`` (state received, before
restoring), ``restored`` (before saying so).

Actions: ``cut`` (the connection drops: both directions shut down), ``corrupt`` (the next frame
sent has a payload bit flipped after it was sealed: its tag fails), ``exit`` (this process dies at
once, as a killed host would: only for a destination in its own process), ``fail`` (this side
raises an error, e.g. a device that cannot save its state), ``tamper`` (only at the destination's
``state``: one bit of guest RAM received intact is flipped, as bad memory would, so the RAM
checksum comparison must refuse it), ``hold`` (this side waits HOLD_SECONDS there, after telling
its ``on_hold`` listener: at the source's ``commit`` the VM stays paused that long, so a test can
type at the source during the pause).
"""

from __future__ import annotations

import os
import socket
import time
from typing import TYPE_CHECKING

from pyhv.migration.stream import MigrationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from pyhv.migration.stream import FrameSocket

SOURCE_PHASES = (
    "connect",
    "config",
    "pass1",
    "pass2",
    "prepare",
    "final",
    "state",
    "commit",
    "resumed",
)
DESTINATION_PHASES = ("authenticate", "config", "build", "memory", "prepare", "state", "restored")
ACTIONS = ("cut", "corrupt", "exit", "fail", "tamper", "hold")
HOLD_SECONDS = 3.0


class FaultPlan:
    """{phase: action}; each fault fires once."""

    def __init__(self, plan: dict[str, str] | None = None) -> None:
        plan = dict(plan or {})
        for phase, action in plan.items():
            if phase not in SOURCE_PHASES + DESTINATION_PHASES:
                raise ValueError(
                    f"unknown fault phase {phase!r}: one of {SOURCE_PHASES + DESTINATION_PHASES}"
                )
            if action not in ACTIONS:
                raise ValueError(f"unknown fault action {action!r}: one of {ACTIONS}")
            if action == "tamper" and phase != "state":
                raise ValueError(f"'tamper' is a fault of the destination's 'state', not {phase!r}")
        self.plan = plan
        self.fired: list[str] = []
        self.on_hold: Callable[[str], object] | None = None

    def at(self, phase: str, fs: FrameSocket | None) -> None:
        """Fire the fault planned at `phase`, if any (``tamper`` is carried out by the
        destination, which holds the guest's memory: it looks in `fired`)."""
        action = self.plan.pop(phase, None)
        if action is None:
            return
        self.fired.append(f"{phase}:{action}")
        if action == "exit":
            os._exit(17)
        if action == "hold":
            if self.on_hold is not None:
                self.on_hold(phase)
            time.sleep(HOLD_SECONDS)  # a window held open on purpose, not a wait for an event
            return
        if action == "fail":
            raise MigrationError(f"injected failure at {phase}", phase)
        if fs is None:
            return
        if action == "cut":
            try:
                fs.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif action == "corrupt":
            fs.corrupt_next = True
