"""Smart Paging's memory: the part of a VM's startup RAM the host could not give it, backed by
a file on disk (the Smart Paging file) instead of a memfd, and moved into host memory when
Dynamic Memory has made room for it.

The range is the top of the VM's RAM: the guest's allocator hands out low memory first, so the
file holds what the guest touches last. It is a MAP_SHARED mapping of the file, a memory slot of
its own; the kernel writes its pages back to the file and drops them when the worker's memory
cgroup (whose limit is the VM's assigned memory, the file excluded) is full: the file pages.
Pages the guest balloons out are punched out of the file (pyhv.memory.manager.release).

:func:`move_to_memory` ends it: the data runs of the file (SEEK_DATA/SEEK_HOLE; ballooned
pages skipped) are copied into a new memfd, which is then mapped over the very same host
addresses (MAP_FIXED): the memory slot, and every view of guest memory the worker holds, stay
where they are, and the kernel's MMU notifier drops KVM's mappings of the file's pages. The
caller pauses the VPs around it. The file is then punched empty and closed; its owner (the
VMMS) deletes it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass
from typing import Any

from pyhv.memory.manager import PAGE_SIZE, punch_hole
from pyhv.memory.ranges import RangeSet

_libc = ctypes.CDLL(None, use_errno=True)
_mmap = _libc.mmap
_mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_mmap.restype = ctypes.c_void_p
MAP_FIXED = 0x10
#: Copied per pread/pwrite: big enough to stream, small enough for the worker's heap.
_CHUNK = 4 << 20


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


class SmartPagingError(OSError):
    """The Smart Paging range could not be mapped or moved; the message says why."""


def _runs(fd: int, size: int) -> list[tuple[int, int]]:
    """(offset, length) of the runs of `fd` that hold data (the rest are holes: zeros)."""
    out, pos = [], 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                break
            raise
        if data >= size:
            break
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        out.append((data, hole - data))
        pos = hole
    return out


def file_bytes(fd: int) -> int:
    """Bytes the Smart Paging file holds on disk (its allocated blocks)."""
    return os.fstat(fd).st_blocks * 512


def move_to_memory(region: Any, ballooned: RangeSet, name: str) -> int:
    """Move the Smart Paging `region` (a pyhv.hypervisor.memory.MemoryRegion backed by the
    file) into a new memfd mapped at the same host address; the VPs must be paused and no
    one else may write the range meanwhile. Returns the bytes copied. On error nothing has
    changed (the file still backs the range)."""
    file_fd, size, base = region.memfd, region.size, region.offset
    first = region.gpa // PAGE_SIZE
    memfd = os.memfd_create(f"{name}-ram", os.MFD_CLOEXEC)
    copied = 0
    try:
        os.ftruncate(memfd, size)
        # Page cache and the mapping are one: dirty pages not yet written back are read too.
        for off, n in _runs(file_fd, size):
            end = off + n
            while off < end:
                take = min(_CHUNK, end - off)
                page, count = off // PAGE_SIZE, -(-take // PAGE_SIZE)
                if ballooned.contains(first + page, count):
                    off += take
                    continue
                data = os.pread(file_fd, take, base + off)
                os.pwrite(memfd, data, off)
                copied += len(data)
                off += take
        # Ballooned pages are not the guest's: holes in the memfd, as in the file.
        for r in ballooned:
            lo, hi = max(r.start, first), min(r.start + r.count, first + size // PAGE_SIZE)
            if lo < hi:
                punch_hole(memfd, (lo - first) * PAGE_SIZE, (hi - lo) * PAGE_SIZE)
        flags = mmap.MAP_SHARED | MAP_FIXED
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        got = _mmap(region.host_address, size, prot, flags, memfd, 0)
        if got != region.host_address:
            err = ctypes.get_errno()
            raise SmartPagingError(
                err,
                f"mmap(MAP_FIXED) of the new memory over the Smart Paging range at "
                f"{region.host_address:#x}: {os.strerror(err)}",
            )
    except BaseException:
        os.close(memfd)
        raise
    # The mapping is the memfd's now: the manager punches it, the region closes it.
    region.memfd, region.offset = memfd, 0
    region.owns_memfd = True
    try:
        punch_hole(file_fd, base, size)  # the disk space goes now, the name with the owner
    except OSError:
        pass  # a file system without holes: it goes when the owner deletes it
    os.close(file_fd)
    return copied
