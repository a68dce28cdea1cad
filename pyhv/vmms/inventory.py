"""The VMMS's VM inventory records: a VM's state names, the service's errors, what it needs of
a worker, and the record it keeps per VM. The service (pyhv.vmms.service) and live migration
(pyhv.vmms.migration) both use them; neither imports the other for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyhv.vmms.claims import WorkerMemory
from pyhv.vmms.config import VmSettings
from pyhv.worker.config import VmConfig
from pyhv.worker.outcome import VmEnd

OFF, STARTING, RUNNING, STOPPING, CRASHED = "off", "starting", "running", "stopping", "crashed"
#: Live migration (pyhv.vmms.migration): a VM arriving here; a VM whose migration is in doubt.
INCOMING, PAUSED = "incoming", "paused"


class VmmsError(Exception):
    """A request the service refuses; `status` is the HTTP status that says why."""

    status = 400


class NotFound(VmmsError):
    status = 404


class Conflict(VmmsError):
    status = 409


class StorageError(VmmsError):
    """The VMMS's state directory refused a write (disk full): nothing was changed."""

    status = 507


class Worker(Protocol):
    """What the service needs of a worker (pyhv.worker.WorkerProcess has it)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def returncode(self) -> int | None: ...

    def start(self) -> None: ...
    def send(self, data: bytes) -> None: ...
    def stop(self) -> None: ...
    def wait(self, timeout: float | None = None) -> VmEnd | None: ...
    def close(self, timeout: float = ...) -> None: ...


WorkerFactory = Callable[[VmConfig, Callable[[bytes], None]], Worker]


@dataclass(eq=False)
class _Vm:
    settings: VmSettings
    state: str = OFF
    reason: str = ""
    worker: Worker | None = None
    started_at: float | None = None
    tail: bytearray = field(default_factory=bytearray)
    consoles: list[Callable[[bytes], None]] = field(default_factory=list)
    #: The id of the migration this VM is part of while it runs (pyhv.vmms.migration).
    migration: str | None = None
    #: The kernel's side of its worker's memory: cgroup limit, claims check (pyhv.vmms.claims).
    memory: WorkerMemory | None = None


#: A VM's entry in the inventory, as live migration (pyhv.vmms.migration) holds it.
VmEntry = _Vm
