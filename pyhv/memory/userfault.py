"""userfaultfd(2) on guest RAM: a missing page of a registered range, touched by a VP (KVM
faults on the memslot) or by the host, stops the toucher until a thread installs the page
(UFFDIO_COPY, or UFFDIO_ZEROPAGE for a zero page). Post-copy live migration is built on it.

Guest RAM is a memfd (shmem): MISSING mode needs UFFD_FEATURE_MISSING_SHMEM (Linux 4.11), and a
page counts as missing only while the memfd has a hole there (fallocate(PUNCH_HOLE) makes one).
Measured on this KVM (../shared/kvm-probes/p15_userfaultfd.py): a guest fault reaches the
thread and resumes after UFFDIO_COPY in ~25-45 us per page.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct

PAGE = 4096
_NR_USERFAULTFD = 323  # x86_64
_UFFD_API = 0xAA


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (0xAA << 8) | nr


_READ, _RW = 2, 3
UFFDIO_API = _ioc(_RW, 0x3F, 24)
UFFDIO_REGISTER = _ioc(_RW, 0x00, 32)
UFFDIO_UNREGISTER = _ioc(_READ, 0x01, 16)
UFFDIO_WAKE = _ioc(_READ, 0x02, 16)
UFFDIO_COPY = _ioc(_RW, 0x03, 40)
UFFDIO_ZEROPAGE = _ioc(_RW, 0x04, 32)
USERFAULTFD_IOC_NEW = 0xAA00  # _IO(0xAA, 0x00) on /dev/userfaultfd

FEATURE_MISSING_SHMEM = 1 << 5
FEATURE_THREAD_ID = 1 << 8
REGISTER_MODE_MISSING = 1
EVENT_PAGEFAULT = 0x12
_MSG = struct.Struct("<B3xI QQI4x")  # event, reserved; flags, address, ptid
assert _MSG.size == 32

_libc = ctypes.CDLL(None, use_errno=True)


class UserfaultError(OSError):
    """userfaultfd is not usable here (kernel, permissions) or an ioctl failed."""


class Fault:
    """One page fault: the page's host address and the thread that waits (its Linux tid)."""

    __slots__ = ("address", "tid", "write")

    def __init__(self, address: int, tid: int, write: bool) -> None:
        self.address, self.tid, self.write = address, tid, write


class Userfault:
    """One userfaultfd in MISSING mode over shmem, with thread ids in its fault messages."""

    def __init__(self, device: int | None = None) -> None:
        """`device`: an open fd of /dev/userfaultfd (Linux 6.1; the right to it was checked
        when it was opened, so a process without privileges can use one passed to it);
        None: the userfaultfd(2) system call."""
        if device is not None:
            try:
                fd = fcntl.ioctl(device, USERFAULTFD_IOC_NEW, os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as e:
                raise UserfaultError(e.errno, f"/dev/userfaultfd (fd {device}): {e}") from None
        else:
            fd = _libc.syscall(_NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd < 0:
            err = ctypes.get_errno()
            raise UserfaultError(
                err,
                f"userfaultfd: {os.strerror(err)} (post-copy needs it for KVM's faults: run the "
                "destination as root, or pass it an fd of /dev/userfaultfd)",
            )
        self.fd = fd
        api = (ctypes.c_uint64 * 3)(_UFFD_API, FEATURE_MISSING_SHMEM | FEATURE_THREAD_ID, 0)
        try:
            fcntl.ioctl(fd, UFFDIO_API, api)
        except OSError as e:
            os.close(fd)
            raise UserfaultError(
                e.errno, f"userfaultfd: this kernel cannot serve memfd (shmem) faults: {e}"
            ) from None
        self._closed = False

    def register(self, address: int, size: int) -> None:
        """Faults on missing pages of [address, address+size) come to this descriptor."""
        reg = (ctypes.c_uint64 * 4)(address, size, REGISTER_MODE_MISSING, 0)
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, reg)
        except OSError as e:
            raise UserfaultError(
                e.errno, f"userfaultfd: cannot register {size:#x} bytes at {address:#x}: {e}"
            ) from None

    def wait(self, timeout: float) -> bool:
        """A fault message is waiting (within `timeout` seconds)."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        return bool(r)

    def read(self, max_faults: int = 64) -> list[Fault]:
        """The faults waiting now (none if there are none)."""
        try:
            msg = os.read(self.fd, _MSG.size * max_faults)
        except BlockingIOError:
            return []
        out = []
        for off in range(0, len(msg) - _MSG.size + 1, _MSG.size):
            event, _r, flags, address, ptid = _MSG.unpack_from(msg, off)
            if event == EVENT_PAGEFAULT:
                out.append(Fault(address & ~(PAGE - 1), ptid, bool(flags & 1)))
        return out

    def copy(self, address: int, source: int, size: int) -> bool:
        """Install `size` bytes at `source` (a buffer's address) as the pages at `address`,
        waking their waiters. False when a page of them was there already (nothing is
        overwritten; the caller wakes the range)."""
        return self._fill(UFFDIO_COPY, (ctypes.c_uint64 * 5)(address, source, size, 0, 0))

    def zero(self, address: int, size: int) -> bool:
        """Install zero pages at `address`; False when a page was there already."""
        return self._fill(UFFDIO_ZEROPAGE, (ctypes.c_uint64 * 4)(address, size, 0, 0))

    def _fill(self, request: int, arg: ctypes.Array[ctypes.c_uint64]) -> bool:
        """UFFDIO_COPY or UFFDIO_ZEROPAGE (`arg` starts with the address); False on EEXIST."""
        try:
            fcntl.ioctl(self.fd, request, arg)
        except OSError as e:
            if e.errno == errno.EEXIST:
                return False
            what = "UFFDIO_COPY" if request == UFFDIO_COPY else "UFFDIO_ZEROPAGE"
            raise UserfaultError(e.errno, f"{what} at {arg[0]:#x}: {e}") from None
        return True

    def wake(self, address: int, size: int) -> None:
        """Wake the threads waiting on pages that are there now."""
        fcntl.ioctl(self.fd, UFFDIO_WAKE, (ctypes.c_uint64 * 2)(address, size))

    def close(self) -> None:
        """Unregister everything: missing pages are the kernel's to fill again (zeros)."""
        if not self._closed:
            self._closed = True
            os.close(self.fd)
