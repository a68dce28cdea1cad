"""Two hosts for live migration: a source worker process running the reference guest, and a
destination worker process listening for it (each with its own socket)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyhv.guest_image import image_path
from tests.guest.shell import Shell
from tests.support.wait import wait_for

TOKEN = "migration-test-token-0123456789"


class Guest(Shell):
    """The guest's shell, on whichever worker runs it now."""

    def __init__(self, vm: Any, banner: bool = True) -> None:
        self.vm = vm
        self.banner = vm.serial.read_until(b"pyhv> ", 30).decode() if banner else ""

    def ticks(self) -> int:
        return self.values("ticks")["ticks"]

    def wait_working_set(self, mb: int, task: int = 0) -> None:
        """Until the task holds its MB and has written all of it at least once (bounded)."""

        def held() -> bool:
            m = re.search(
                rf"task {task}: .*allocated (\d+) MiB, touched (\d+) pages", self.run("tasks")
            )
            return bool(m and int(m[1]) >= mb and int(m[2]) >= mb * 256)

        wait_for(held, 60, f"task {task} holding its {mb} MiB working set")

    def touched(self, task: int = 0) -> int:
        m = re.search(rf"task {task}: .*touched (\d+) pages", self.run("tasks"))
        assert m, "no such task"
        return int(m[1])


def moved(dest: Any) -> Guest:
    """The guest's shell on the destination after a migration (no banner there: the guest
    already booted)."""
    return Guest(dest, banner=False)


@pytest.fixture
def hosts() -> Iterator[Any]:
    """boot(memory) -> (source worker, Guest); destination(**kw) -> IncomingWorker listening."""
    from pyhv.migration.worker import IncomingWorker
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    workers: list[Any] = []

    class Hosts:
        def boot(self, memory: str = "128M", prefix: list[str] | None = None) -> tuple[Any, Guest]:
            w = WorkerProcess(VmConfig.create(image=image_path(), memory=memory))
            w.command_prefix = prefix or []
            workers.append(w)
            w.start()
            return w, Guest(w)

        def destination(self, prefix: list[str] | None = None, **kw: Any) -> Any:
            kw.setdefault("accept_timeout", 60.0)
            kw.setdefault("timeout", 20.0)
            d = IncomingWorker(kw.pop("token", TOKEN), **kw)
            d.command_prefix = prefix or []
            workers.append(d)
            d.start()
            return d

    yield Hosts()
    for w in workers:
        w.close()


def wait_rising(read: Callable[[], int], timeout: float = 30) -> tuple[int, int]:
    """Two readings of a counter that must rise (polled, with a deadline)."""
    first = read()
    later = wait_for(lambda: (v := read()) > first and v, timeout, f"{read.__qualname__} rising")
    return first, later
