"""The worker's part of Smart Paging: the Smart Paging file its owner opened and passed (an fd
and the bytes of startup RAM the host could not give) is mapped as the top of the VM's RAM, a
memory slot of its own (pyhv.memory.smartpaging says why the top and how it ends)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyhv.memory.manager import PAGE_SIZE
from pyhv.memory.smartpaging import SmartPagingFile

if TYPE_CHECKING:
    from pyhv.hypervisor import Partition
    from pyhv.hypervisor.memory import MemoryRegion


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
    # Its guest writes logged: the end copies it while the VPs run, then only what they wrote.
    return partition.add_memory(base + size - file.size, file.size, track_dirty=True, memfd=file.fd)
