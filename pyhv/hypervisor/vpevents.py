"""What a virtual processor reports when its thread ends (`VpEvent`), and the states it is in."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from pyhv.hypervisor.registers import Registers, SpecialRegisters


class VpEventKind(enum.Enum):
    HALT = "halt"  # HLT with no halt intercept: the VP stopped
    SHUTDOWN = "shutdown"  # triple fault: the VP stopped; `registers` holds its state
    STOPPED = "stopped"  # stop() was called
    ERROR = "error"  # unknown/internal exit or a handler raised: the VP stopped


@dataclass
class VpEvent:
    kind: VpEventKind
    vp_index: int
    detail: str = ""
    registers: Registers | None = None
    special_registers: SpecialRegisters | None = None
    error: BaseException | None = None
    exit: object | None = None


class VpState(enum.Enum):
    IDLE = "idle"  # not started, or its thread ended
    RUNNING = "running"
    PAUSED = "paused"


class VpStopped(Exception):
    """Raised in a VP thread to end it with an event (internal)."""

    def __init__(self, event: VpEvent) -> None:
        self.event = event
