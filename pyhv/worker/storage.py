"""The worker's synthetic storage: the page file's disk offered to the guest on VMBus.

It owns, for one VM with a `page_file_size`, the :class:`~pyhv.storage.disk.Disk` (a sparse host
file: the configured `page_file`, or one of the worker's own in the temporary directory,
removed at close) and the :class:`~pyhv.storage.vsp.StorageVsp` behind an offer of Hyper-V's
synthetic SCSI class on the VM's VMBus controller (the one the Dynamic Memory service runs,
ports 0x0E00-0x0E33). The guest rings its doorbell with a port write that exits to the VP's
thread (only the DM channel has an ioeventfd), so each request is served there and its response
is in the ring when the write returns. A buffer may name any guest RAM page the DM VSP knows
(hot-added too) that is not ballooned.

`save()` / `restore()` carry the disk's written blocks and the counters across a live migration;
the channel itself travels with the VMBus controller in the DM service's state.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyhv.storage import protocol as sp
from pyhv.storage.disk import Disk
from pyhv.storage.vsp import StorageVsp, StorageVspState

if TYPE_CHECKING:
    from pyhv.hypervisor import Partition
    from pyhv.worker.config import VmConfig
    from pyhv.worker.dynmem import DynamicMemoryService

log = logging.getLogger("pyhv.worker.storage")


class StorageService:
    """The page file's disk and its VSP for one partition (see the module docstring)."""

    def __init__(
        self, partition: Partition, config: VmConfig, dynmem: DynamicMemoryService
    ) -> None:
        self._own_file = not config.page_file
        # gettempdir() probes by creating and unlinking a file: not in a jail's seccomp list
        self.path = config.page_file_path(tempfile.gettempdir() if self._own_file else "")
        self.disk = Disk(self.path, config.page_file_size)
        name = config.name

        def usable(pfn: int) -> bool:  # looked up each time: restore() replaces the sets
            return dynmem.vsp.ram.contains(pfn, 1) and not dynmem.mm.partitions[
                name
            ].ballooned.overlaps(pfn, 1)

        self.vsp = StorageVsp(self.disk, partition.view, usable, name=f"storage-{name}")
        self.offer = dynmem.controller.offer(
            sp.STORAGE_GUID, self.vsp.bind, ring_data_bytes=sp.RING_DATA_BYTES
        )
        log.info(
            "%s: page file disk of %d MiB in %s, VMBus channel %d",
            config.name,
            config.page_file_size >> 20,
            self.path,
            self.offer.relid,
        )

    def status(self) -> dict[str, Any]:
        """The operator's view: the disk, its written blocks and the VSP's counters."""
        return {
            "path": str(self.path),
            "size_bytes": self.disk.size,
            "written_bytes": self.disk.written.pages * 4096,
            "state": self.vsp.state.name,
            "counters": dict(self.vsp.counters),
        }

    def save(self) -> StorageVspState:
        return self.vsp.save()

    def check(self, state: StorageVspState) -> None:
        self.vsp.check(state)

    def restore(self, state: StorageVspState) -> None:
        self.vsp.restore(state)

    def close(self) -> None:
        self.disk.close()
        if self._own_file:
            Path(self.path).unlink(missing_ok=True)
