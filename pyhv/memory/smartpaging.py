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
caller pauses the VPs around it; or copies first while they run (:func:`copy_data`, the range's
memory slot logging the guest's writes) and, paused, only the pages written since. Then, with
the VPs running again, the file is punched empty and closed; its owner (the VMMS) deletes it.
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


def new_memory(region: Any, name: str) -> int:
    """A memfd the size of the Smart Paging `region`, for :func:`move_to_memory`."""
    memfd = os.memfd_create(f"{name}-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, region.size)
    except BaseException:
        os.close(memfd)
        raise
    return memfd


def copy_data(region: Any, memfd: int, ballooned: RangeSet) -> int:
    """Copy every data run of the Smart Paging file (holes and ballooned runs skipped) into
    `memfd` at the same offsets; the bytes copied. The page cache and the guest's mapping are
    one: pages not yet written back are read too."""
    file_fd, base, first = region.memfd, region.offset, region.gpa // PAGE_SIZE
    copied = 0
    for off, n in _runs(file_fd, region.size):
        end = off + n
        while off < end:
            take = min(_CHUNK, end - off)
            if not ballooned.contains(first + off // PAGE_SIZE, -(-take // PAGE_SIZE)):
                copied += os.pwrite(memfd, os.pread(file_fd, take, base + off), off)
            off += take
    return copied


def copy_pages(region: Any, memfd: int, gpas: list[int]) -> int:
    """Copy the pages at `gpas` (ascending, in the region: those the guest wrote since a
    pre-copy) from the file into `memfd` again; the bytes copied."""
    copied, i = 0, 0
    while i < len(gpas):
        j = i + 1
        while j < len(gpas) and gpas[j] == gpas[j - 1] + PAGE_SIZE and j - i < _CHUNK // PAGE_SIZE:
            j += 1
        off, n = gpas[i] - region.gpa, (j - i) * PAGE_SIZE
        copied += os.pwrite(memfd, os.pread(region.memfd, n, region.offset + off), off)
        i = j
    return copied


def move_to_memory(
    region: Any,
    ballooned: RangeSet,
    name: str,
    *,
    memfd: int | None = None,
    dirty: list[int] | None = None,
) -> int:
    """Move the Smart Paging `region` (a pyhv.hypervisor.memory.MemoryRegion backed by the
    file) into a memfd mapped at the same host address; the VPs must be paused and no one
    else may write the range meanwhile. Without `memfd`, all its data is copied now; with
    `memfd` (from :func:`new_memory`, filled by :func:`copy_data` while the VPs ran), only the
    pages at `dirty` (the guest's writes since) are copied again. Returns the bytes copied
    now. On error nothing has changed (the file still backs the range; a given `memfd` is
    the caller's to close). The file's fd stays open: :func:`release_file` once the VPs run."""
    size = region.size
    first = region.gpa // PAGE_SIZE
    own = memfd is None
    if memfd is None:
        memfd = new_memory(region, name)
    try:
        if own:
            copied = copy_data(region, memfd, ballooned)
        else:
            copied = copy_pages(region, memfd, dirty or [])
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
        if own:
            os.close(memfd)
        raise
    # The mapping is the memfd's now: the manager punches it, the region closes it.
    region.memfd, region.offset = memfd, 0
    region.owns_memfd = True
    return copied


def release_file(fd: int, offset: int, size: int) -> None:
    """After the move (the VPs may run again): the file's disk space goes now (its name goes
    with its owner, the VMMS), and the worker's fd on it is closed."""
    try:
        punch_hole(fd, offset, size)
    except OSError:
        pass  # a file system without holes: the space goes when the owner deletes it
    os.close(fd)
