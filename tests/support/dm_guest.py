"""A running reference guest with Dynamic Memory, driven through its shell: the VM, the status
reports it published, and the guest's own view (`mem`, `dm`), for the end-to-end DM tests."""

from __future__ import annotations

import re
from typing import Any

from pyhv.dynmem.status import MemoryStatus
from pyhv.worker import VirtualMachine, VmConfig
from pyhv.worker.script import ENTER, PROMPT
from tests.support.wait import wait_for


class DmGuest:
    """The reference guest booted with `dynamic_memory=True` and `cfg`, negotiated."""

    def __init__(self, image: str, **cfg: Any) -> None:
        self.reports: list[MemoryStatus] = []
        self.vm = VirtualMachine(
            VmConfig.create(image=image, dynamic_memory=True, **cfg),
            on_memory_status=self.reports.append,
        )
        self.vm.start()
        self.vm.serial.read_until(PROMPT, 60)
        assert wait_for(lambda: self.dm.negotiated, 30, "self.dm.negotiated"), self.dm.status()

    @property
    def dm(self) -> Any:
        assert self.vm.dynmem is not None
        return self.vm.dynmem

    def shell(self, command: str, timeout: float = 60) -> str:
        self.vm.send(command.encode() + ENTER)
        out = self.vm.serial.read_until(PROMPT, timeout).decode()
        assert command in out, out
        return out[out.index(command) + len(command) : -len(PROMPT)].replace("\r\n", "\n")

    def mem(self) -> dict[str, int]:
        out = self.shell("mem")
        return {k: int(v) for k, v in re.findall(r"^([a-z-]+): (\d+) MiB$", out, re.M)}

    def dm_counters(self) -> dict[str, str]:
        return dict(re.findall(r"^([a-z-]+): (.*)$", self.shell("dm"), re.M))

    def use(self, mib: int) -> None:
        """testlimit: commit `mib` MiB and touch it (at CPL3, in the background)."""
        assert f"committed {mib} MiB" in self.shell(f"testlimit -m {mib} -c 1")

    def target(self, size: int) -> dict[str, Any]:
        plan = self.vm.set_memory_target(size)
        assert self.vm.wait_memory_idle(120)
        return plan  # type: ignore[no-any-return]

    def close(self) -> None:
        self.vm.close()
