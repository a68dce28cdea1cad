"""The worker's part of Smart Paging: the Smart Paging file its owner opened and passed (an fd
and the bytes of startup RAM the host could not give) is mapped as the top of the VM's RAM, a
memory slot of its own (pyhv.memory.smartpaging says why the top and how it ends)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyhv.memory.manager import PAGE_SIZE

if TYPE_CHECKING:
    from pyhv.hypervisor import Partition
    from pyhv.hypervisor.memory import MemoryRegion

#: The range is whole 2 MiB blocks (the guest's allocation unit), as the VMMS plans it.
ALIGN = 2 << 20


class SmartPagingRefused(ValueError):
    """The Smart Paging file given cannot back this VM's RAM; the message says why."""


@dataclass(frozen=True)
class SmartPagingFile:
    """The file (an fd open for reading and writing) and the bytes of RAM it backs."""

    fd: int
    size: int

    def check(self, ram: list[tuple[int, int]]) -> None:
        """Refuse a size that is not whole 2 MiB blocks, or more than the top RAM region, or
        an fd that is not a regular file of at least that size."""
        top = ram[-1][1]
        if self.size <= 0 or self.size % ALIGN or self.size >= top:
            raise SmartPagingRefused(
                f"Smart Paging of {self.size} bytes: must be whole 2 MiB blocks, less than the "
                f"top RAM region's {top} bytes"
            )
        try:
            st = os.fstat(self.fd)
        except OSError as e:
            raise SmartPagingRefused(f"Smart Paging file fd {self.fd}: {e}") from None
        if not (st.st_mode & 0o170000 == 0o100000 and st.st_size >= self.size):
            raise SmartPagingRefused(
                f"Smart Paging file fd {self.fd} is not a regular file of {self.size} bytes"
            )


def map_ram(
    partition: Partition, ram: list[tuple[int, int]], file: SmartPagingFile | None
) -> MemoryRegion | None:
    """Back the VM's RAM (`ram`: (gpa, size) pairs, ascending): memfds, and with `file` the
    top `file.size` bytes from the file. Returns the Smart Paging region (None without)."""
    if file is None:
        for base, size in ram:
            partition.add_memory(base, size)
        return None
    file.check(ram)
    *low, (base, size) = ram
    for b, s in low:
        partition.add_memory(b, s)
    partition.add_memory(base, size - file.size)
    assert file.size % PAGE_SIZE == 0
    return partition.add_memory(base + size - file.size, file.size, memfd=file.fd)
