"""The virtual disk behind the storage VSP: a sparse host file of whole 4 KiB blocks.

The file is created (or emptied) at VM start and sized to the disk (sparse: only written blocks
take host space). The disk keeps which blocks the guest has written (`written`, block ranges),
so its :class:`DiskState` can carry exactly those blocks across a live migration (zlib
compressed, bounded by MAX_SAVED_BYTES): the destination writes them into its own file, and the
file need not be shared between the hosts.
"""

from __future__ import annotations

import fcntl
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyhv import wire
from pyhv.memory.manager import punch_hole
from pyhv.memory.ranges import PageRange, RangeSet

BLOCK = 4096
DISK_STATE_VERSION = 1
#: The compressed written blocks a saved state may hold: the migration STATE frame is at most
#: 8 MiB (pyhv.migration.stream.MAX_FRAME) with every other component's state and base64.
MAX_SAVED_BYTES = 4 << 20
#: The largest disk (bytes): more than a page file of any VM pyhv runs.
MAX_DISK = 64 << 30
#: `struct flock` on x86-64: l_type, l_whence, l_start, l_len, l_pid (0 for an OFD lock).
_FLOCK = struct.Struct("hh4xqqi4x")
assert _FLOCK.size == 32


class DiskError(OSError):
    """The host file cannot serve the disk (the message names the file and the remedy)."""


@dataclass(frozen=True)
class DiskState:
    """The disk's size and the blocks the guest wrote, with their contents (zlib)."""

    version: int
    size: int
    written: tuple[PageRange, ...]
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> DiskState:
        """The shape (types, declared by the fields); restore() checks the values."""
        return wire.from_wire(cls, d, "storage disk state")


class Disk:
    """`size` bytes (a multiple of 4 KiB) in the host file `path`."""

    def __init__(self, path: str | os.PathLike[str], size: int) -> None:
        if size <= 0 or size % BLOCK or size > MAX_DISK:
            raise DiskError(
                f"disk size {size} bytes: use a multiple of {BLOCK} bytes up to {MAX_DISK >> 30} GiB"
            )
        self.path = Path(path)
        self.size = size
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DiskError(
                f"cannot open the disk file {str(self.path)!r}: {e.strerror}; give a path the "
                "worker may write"
            ) from None
        try:  # two VMs on one file would read each other's pages (and a migration's two ends)
            # An open file description lock (fcntl: in a jailed worker's seccomp list, flock is
            # not): held by this fd alone, so a second Disk in the same process conflicts too.
            fcntl.fcntl(
                self.fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
            )
        except OSError:
            os.close(self.fd)
            raise DiskError(
                f"the disk file {str(self.path)!r} is in use by another VM: give each VM its own"
            ) from None
        try:
            os.ftruncate(self.fd, 0)  # a new boot's page file: nothing of an old one is read
            os.ftruncate(self.fd, size)  # sparse
        except OSError as e:
            os.close(self.fd)
            raise DiskError(f"cannot size the disk file {str(self.path)!r}: {e.strerror}") from None
        #: Blocks the guest has written (block numbers of BLOCK bytes).
        self.written = RangeSet()

    @property
    def sectors(self) -> int:
        return self.size // 512

    def read(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) != n:
            raise DiskError(f"short read of {len(data)} of {n} bytes at {offset} in {self.path}")
        return data

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        done = os.pwrite(self.fd, data, offset)
        if done != len(data):
            raise DiskError(
                f"short write of {done} of {len(data)} bytes at {offset} in {self.path}"
            )
        first, last = offset // BLOCK, (offset + len(data) - 1) // BLOCK
        for r in list(self.written):  # mark [first, last] written, merging what is there
            if r.end <= first or r.start > last:
                continue
            self.written.remove(r.start, r.count)
            first, last = min(first, r.start), max(last, r.end - 1)
        self.written.add(first, last - first + 1)

    def unmap(self, offset: int, n: int) -> None:
        """Whole blocks the guest no longer needs: out of the file (a hole) and of `written`."""
        if offset % BLOCK or n % BLOCK:
            raise ValueError(f"unmap {offset}+{n}: whole {BLOCK}-byte blocks only")
        try:
            punch_hole(self.fd, offset, n)
        except OSError as e:
            raise DiskError(f"{self.path}: {e}") from None
        first, count = offset // BLOCK, n // BLOCK
        for r in list(self.written):  # keep what lies outside [first, first + count)
            lo, hi = max(r.start, first), min(r.end, first + count)
            if lo < hi:
                self.written.remove(lo, hi - lo)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- save / restore (live migration) --------------------------------------------------

    def save(self) -> DiskState:
        """The written blocks; DiskError if they do not fit a state (compressed)."""
        z = zlib.compressobj(6)
        out = []
        for r in self.written:
            for off in range(r.start * BLOCK, r.end * BLOCK, 1 << 20):
                n = min(1 << 20, r.end * BLOCK - off)
                out.append(z.compress(self.read(off, n)))
        out.append(z.flush())
        data = b"".join(out)
        if len(data) > MAX_SAVED_BYTES:
            raise DiskError(
                f"the disk {self.path} has {self.written.pages * BLOCK >> 20} MiB written "
                f"({len(data) >> 20} MiB compressed), more than a VM state carries "
                f"({MAX_SAVED_BYTES >> 20} MiB): let the guest free its page file first"
            )
        return DiskState(DISK_STATE_VERSION, self.size, tuple(self.written), data)

    def check(self, st: DiskState) -> bytes:
        """The blocks `st` holds, decompressed, if it fits this disk; ValueError if not."""
        if st.version != DISK_STATE_VERSION:
            raise ValueError(f"disk state version {st.version!r} is not {DISK_STATE_VERSION}")
        if st.size != self.size:
            raise ValueError(
                f"the source's disk has {st.size} bytes, this one {self.size}: configure the "
                "same page_file_size on both"
            )
        if len(st.data) > MAX_SAVED_BYTES:
            raise ValueError(f"disk state of {len(st.data)} bytes: at most {MAX_SAVED_BYTES}")
        total, last_end = 0, -1
        for start, count in st.written:
            if start <= last_end or count <= 0 or (start + count) * BLOCK > self.size:
                raise ValueError(
                    f"disk state: written blocks [{start}, +{count}) are out of order, empty or "
                    f"beyond the disk of {self.size // BLOCK} blocks"
                )
            last_end = start + count
            total += count * BLOCK
        d = zlib.decompressobj()
        try:
            data = d.decompress(st.data, total + 1)  # bounded: a zip bomb stops here
        except zlib.error as e:
            raise ValueError(f"disk state: the written blocks do not decompress: {e}") from None
        if len(data) != total or not d.eof:
            raise ValueError(
                f"disk state: {len(data)} bytes of blocks where the ranges name {total}"
            )
        return data

    def restore(self, st: DiskState) -> None:
        """Write the source's blocks into this file (checked first: ValueError, no change)."""
        data = self.check(st)
        pos = 0
        for start, count in st.written:
            n = count * BLOCK
            self.write(start * BLOCK, memoryview(data)[pos : pos + n])
            pos += n
