"""How much host memory stands behind a guest's RAM right now: the resident pages of the
memfd mappings, counted with mincore(2) (a page of a shared mapping counts once it is in the
memfd, whichever process or KVM touched it)."""

from __future__ import annotations

import ctypes
import os

PAGE = os.sysconf("SC_PAGE_SIZE")
_CHUNK = 1 << 30  # mincore's vector for 1 GiB is 256 KiB

_libc: ctypes.CDLL | None = None


def _mincore() -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # libc, without find_library (it execs)
        _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        _libc.mincore.restype = ctypes.c_int
    return _libc.mincore


def resident_bytes(address: int, size: int) -> int:
    """Bytes of [address, address+size) resident in host memory (address page-aligned)."""
    if address % PAGE or size < 0:
        raise ValueError(f"mapping {address:#x}+{size:#x} must start on a {PAGE}-byte page")
    mincore = _mincore()
    total = 0
    for off in range(0, size, _CHUNK):
        n = min(_CHUNK, size - off)
        pages = (n + PAGE - 1) // PAGE
        vec = (ctypes.c_ubyte * pages)()
        if mincore(address + off, n, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore({address + off:#x}, {n:#x}): {os.strerror(err)}")
        total += sum(1 for b in bytes(vec) if b & 1) * PAGE
    return total
