"""Fake workers for the VMMS tests, no KVM: `FakeWorker` makes the same calls as WorkerProcess for
the service and API tests; `FakeStatusWorker` pushes memory statuses for the balancer tests."""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyhv.dynmem.balancer import PAGE_SIZE
from pyhv.dynmem.status import MemoryStatus
from pyhv.vmms.pool import HostPool
from pyhv.worker.config import VmConfig
from pyhv.worker.outcome import STOPPED, WORKER_ERROR, VmEnd

if TYPE_CHECKING:
    from pyhv.vmms.client import VmmsClient
    from pyhv.vmms.service import Vmms

_pids = itertools.count(900_000)


class FakeWorker:
    """Echoes serial input back as output; `crash()` ends it as a SIGKILL would."""

    instances: list[FakeWorker] = []

    def __init__(self, config: VmConfig, output: Callable[[bytes], None]) -> None:
        self.config = config
        self._output = output
        self._end: VmEnd | None = None
        self._ended = threading.Event()
        self.pid: int | None = None
        self.returncode: int | None = None
        FakeWorker.instances.append(self)

    def start(self) -> None:
        self.pid = next(_pids)
        self._output(b"pyhv> ")

    def send(self, data: bytes) -> None:
        self._output(data.replace(b"\r", b"\r\n"))

    def stop(self) -> None:
        self._finish(VmEnd(STOPPED, detail="stopped by its owner"), 0)

    def crash(self) -> None:
        self._finish(
            VmEnd(WORKER_ERROR, detail="the worker process exited (code -9) without a report"), -9
        )

    def _finish(self, end: VmEnd, code: int) -> None:
        if not self._ended.is_set():
            self._end, self.returncode = end, code
            self._ended.set()

    def wait(self, timeout: float | None = None) -> VmEnd | None:
        return self._end if self._ended.wait(timeout) else None

    def close(self, timeout: float = 5.0) -> None:
        self.stop()


class FakeDmWorker(FakeWorker):
    """A fake worker with a Dynamic Memory channel whose guest reports once, as it starts."""

    def __init__(self, config: VmConfig, output: Callable[[bytes], None]) -> None:
        super().__init__(config, output)
        self._listeners: list[Callable[[MemoryStatus], object]] = []

    def subscribe_memory_status(
        self,
        on_status: Callable[[MemoryStatus], object],
        on_refused: object = None,
        on_refused_by_worker: object = None,
    ) -> None:
        self._listeners.append(on_status)

    def status(self) -> MemoryStatus:
        """What its guest reports: half of its memory committed."""
        pages = self.config.memory // 4096
        return MemoryStatus(pages, pages, 0, pages // 2, pages // 2, pages // 2)

    def start(self) -> None:
        super().start()
        wire = self.status().to_wire()
        for listener in self._listeners:
            listener(MemoryStatus.from_wire(wire))  # as it crosses the socket

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        self.target = target_bytes
        return {}

    def set_memory_limits(self, minimum: int, maximum: int) -> dict[str, Any]:
        """Recorded in `limits`; `refuse_limits` makes the worker refuse (as a real one does a
        minimum going up)."""
        if getattr(self, "refuse_limits", None):
            raise RuntimeError(self.refuse_limits)
        self.limits = (minimum, maximum)
        return {"minimum_pages": minimum // 4096, "maximum_pages": maximum // 4096}


class FakeIncomingBase(FakeWorker):
    """An incoming migration's worker that 'listens' (never a real port) and records what the
    VMMS told it in `kw`; whether and when a VM arrives is its subclass's."""

    def __init__(self, token: str, listen: tuple[str, int], output: Any, **kw: Any) -> None:
        super().__init__(None, output)  # type: ignore[arg-type]
        self.token, self.kw = token, kw

    def start(self) -> None:
        self.pid = 1

    def wait_listening(self, timeout: float = 30.0) -> tuple[str, int]:
        return ("127.0.0.1", 1)

    def wait_migrated(self, timeout: float | None = None) -> dict[str, Any] | None:
        return None

    @property
    def end(self) -> VmEnd | None:
        return self._end


@contextlib.contextmanager
def fake_service(
    state_dir: Path, worker: type[FakeWorker] = FakeWorker, **kw: Any
) -> Iterator[tuple[Vmms, VmmsClient]]:
    """A Vmms with fake workers of class `worker` (booting nothing: the bundled guest is this
    file) serving its Unix socket; `kw` goes to Vmms."""
    from pyhv.vmms.client import VmmsClient
    from pyhv.vmms.server import ApiServers
    from pyhv.vmms.service import Vmms

    FakeWorker.instances.clear()
    kw.setdefault("budget_bytes", 4 << 30)
    kw.setdefault("image_resolver", lambda: __file__)
    vmms = Vmms(state_dir, worker_factory=lambda config, output: worker(config, output), **kw)
    servers = ApiServers(vmms, state_dir / "vmms.sock", None)
    servers.start()
    try:
        yield vmms, VmmsClient(socket_path=servers.unix.path, timeout=10)
    finally:
        servers.close()
        vmms.close()


MIB = 256  # pages


class FakeStatusWorker:
    """A worker whose guest reports `committed` pages; targets are carried out when told to.
    Like a real worker it pushes its status to the pool (when the guest reports, and when an
    operation is done); the balancer never asks for it."""

    def __init__(self, startup: int, committed: int | None) -> None:
        self.visible = startup
        self.assigned = startup
        self._committed = committed
        self.targets: list[int] = []
        self.busy = False
        self._pool: HostPool | None = None
        self._name = ""

    def attach(self, pool: HostPool, name: str) -> None:
        self._pool, self._name = pool, name
        self.push()

    @property
    def committed(self) -> int | None:
        return self._committed

    @committed.setter
    def committed(self, pages: int | None) -> None:
        self._committed = pages  # the guest's next status report
        self.push()

    def status(self) -> MemoryStatus:
        reported = self._committed is not None
        return MemoryStatus(
            visible_pages=self.visible,
            assigned_pages=self.assigned,
            ballooned_pages=self.visible - self.assigned,
            committed_pages=self._committed,
            available_pages=0 if reported else None,
            guest_committed_pages=self._committed,
            busy=self.busy,
        )

    def push(self) -> None:
        if self._pool is not None:
            self._pool.record(self._name, self.status())

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        self.targets.append(target_bytes // PAGE_SIZE)
        self.busy = True
        return {}

    def carry_out(self) -> None:
        """Unballoon first, then hot-add, or balloon: as the worker's DM service does."""
        target = self.targets[-1]
        if target > self.assigned:
            self.visible = max(self.visible, target)
        self.assigned = target
        self.busy = False
        self.push()
