"""Guest RAM in 2 MiB pages: files on a private tmpfs mounted with ``huge=within_size``.

A memfd lives on the kernel's internal shmem mount, which follows the system's
``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` (``never`` on many hosts): its pages are
4 KiB, and discarding 768 MiB of them (free-page hints, a balloon) frees 196 608 pages one by one,
~0.3 µs each on an idle host and several times that on a loaded one. On a tmpfs of its own mounted
with ``huge=within_size`` the same memory is 384 folios of 2 MiB, freed ~30 times faster.

The tmpfs is made with the new mount API (fsopen, fsconfig, fsmount) and never attached to a
path: no system setting or visible mount changes; it lives as long as the mount fd or a file on
it is open. Each RAM region is an unnamed file on it (``O_TMPFILE``), used exactly like a memfd
(mmap, fallocate(PUNCH_HOLE), SEEK_DATA/SEEK_HOLE, userfaultfd). Punching 4 KiB out of a 2 MiB
folio splits it and frees those pages (a balloon's ranges); a guest that touches one byte of a
never-written 2 MiB block gets the whole block backed: the host backs the guest's RAM in 2 MiB
steps, never beyond the regions' sizes.

Mounting needs CAP_SYS_ADMIN: for a jailed worker (no capabilities) the VMMS mounts it, owned by
the worker's uid, and the worker gets the mount's fd (:meth:`HugeRam.from_fd`).
"""

from __future__ import annotations

import ctypes
import os
import stat

from pyhv.memory.manager import PAGE_SIZE

#: The folio size the mount asks for.
HUGE_PAGE = 2 << 20

_SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 430, 431, 432  # x86_64
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 1, 6

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_L = ctypes.c_long  # syscall(2) reads every argument as a long


class HugeRamError(OSError):
    """Guest RAM in 2 MiB pages cannot be had here (the reason and the remedy in the text)."""


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        remedy = (
            ": mounting a private tmpfs needs CAP_SYS_ADMIN (a jailed worker has none): run the "
            "VM without huge pages"
            if err == 1
            else ": this kernel lacks the new mount API (5.2+) or tmpfs huge pages"
        )
        raise HugeRamError(err, f"{what}: {os.strerror(err)}{remedy}")
    return result


class HugeRam:
    """A private tmpfs (``huge=within_size``, at most `limit` bytes, mode 0700) whose files back
    guest RAM. :meth:`new_file` is a drop-in for memfd_create + ftruncate."""

    def __init__(self, limit: int, owner: tuple[int, int] | None = None) -> None:
        """`owner`: (uid, gid) of the tmpfs's root, for a jailed worker of another uid that
        gets the mount fd (the VMMS mounts it: the worker cannot); default the caller's."""
        if limit <= 0 or limit % PAGE_SIZE:
            raise HugeRamError(22, f"tmpfs limit {limit:#x}: need a multiple of 4 KiB > 0")
        options = [("huge", "within_size"), ("mode", "0700"), ("size", str(limit))]
        if owner is not None:
            options += [("uid", str(owner[0])), ("gid", str(owner[1]))]
        fs = _check(_syscall(_L(_SYS_FSOPEN), b"tmpfs", _L(_FSOPEN_CLOEXEC)), "fsopen(tmpfs)")
        try:
            # the limit: tmpfs's default (half the host's RAM) could be smaller than a big VM
            for key, value in options:
                _check(
                    _syscall(
                        _L(_SYS_FSCONFIG),
                        _L(fs),
                        _L(_FSCONFIG_SET_STRING),
                        key.encode(),
                        value.encode(),
                        _L(0),
                    ),
                    f"fsconfig(tmpfs, {key}={value})",
                )
            _check(
                _syscall(_L(_SYS_FSCONFIG), _L(fs), _L(_FSCONFIG_CMD_CREATE), None, None, _L(0)),
                "tmpfs",
            )
            self.mount_fd = _check(
                _syscall(_L(_SYS_FSMOUNT), _L(fs), _L(_FSMOUNT_CLOEXEC), _L(0)), "fsmount"
            )
        finally:
            os.close(fs)
        self.limit = limit

    @classmethod
    def from_fd(cls, mount_fd: int) -> HugeRam:
        """The mount made by another process (the VMMS, for a jailed worker), by its fd."""
        st = os.fstat(mount_fd)
        if not stat.S_ISDIR(st.st_mode):
            raise HugeRamError(20, f"fd {mount_fd} is not a mounted tmpfs's root directory")
        self = cls.__new__(cls)
        self.mount_fd, self.limit = mount_fd, 0
        return self

    def new_file(self, name: str, size: int) -> int:
        """An unnamed file of `size` bytes on the mount (`name` is for the caller's logs: an
        O_TMPFILE file has none), open read-write, close-on-exec."""
        del name
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600, dir_fd=self.mount_fd)
        try:
            os.ftruncate(fd, size)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def close(self) -> None:
        """Drop the mount fd; the tmpfs goes when its last file is closed."""
        if self.mount_fd >= 0:
            os.close(self.mount_fd)
            self.mount_fd = -1
