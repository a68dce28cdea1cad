"""One small typed object per KVM_EXIT_* kind, decoded from the vCPU's kvm_run page.

`RunPage` (pyhv.kvm.runpage) reads the page. Its `decode()` makes a fresh exit
object with `decode()` below; the hot path of a VP loop instead reads `reason` and then only the
fields of that kind, so an exit costs no allocation it does not need. This module is imported
only when an exit is decoded (or its classes are used).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Protocol

from pyhv.kvm import constants as c
from pyhv.kvm.structs import RUN_UNION

_U = RUN_UNION


@dataclass(slots=True)
class IoExit:
    """Port I/O: `count` elements of `size` bytes at `data_offset` in the run page."""

    port: int
    size: int
    is_write: bool
    count: int
    data_offset: int


@dataclass(slots=True)
class MmioExit:
    """An access to a GPA with no RAM behind it, or a write to a read-only slot."""

    gpa: int
    length: int
    is_write: bool
    data: bytes


@dataclass(slots=True)
class MsrExit:
    """RDMSR/WRMSR sent to user space (filtered, unknown or invalid MSR)."""

    index: int
    is_write: bool
    reason: int
    data: int


@dataclass(slots=True)
class DebugExit:
    """#DB or #BP taken while guest debugging is enabled."""

    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(slots=True)
class HltExit:
    """HLT with no in-kernel LAPIC to wait on."""


@dataclass(slots=True)
class ShutdownExit:
    """Triple fault (or another reason the CPU would shut down)."""


@dataclass(slots=True)
class IntrExit:
    """KVM_RUN was interrupted by a signal."""


@dataclass(slots=True)
class InternalErrorExit:
    """KVM could not go on: e.g. the instruction emulator failed (suberror 1)."""

    suberror: int
    data: tuple[int, ...]


@dataclass(slots=True)
class SystemEventExit:
    """Guest-requested shutdown/reset/crash (PSCI-like events; rare on x86)."""

    type: int
    data: tuple[int, ...]


@dataclass(slots=True)
class FailEntryExit:
    """The hardware refused to enter the guest."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(slots=True)
class UnknownExit:
    """Any exit reason this binding does not decode; `raw` is the 256-byte union."""

    reason: int
    raw: bytes

    @property
    def name(self) -> str:
        return c.EXIT_NAMES.get(self.reason, f"reason {self.reason}")


Exit = (
    IoExit
    | MmioExit
    | MsrExit
    | DebugExit
    | HltExit
    | ShutdownExit
    | IntrExit
    | InternalErrorExit
    | SystemEventExit
    | FailEntryExit
    | UnknownExit
)

_IO = struct.Struct("<BBHIQ")
_MMIO = struct.Struct("<Q8sIB")
_MSR = struct.Struct("<B7xIIQ")
_DEBUG = struct.Struct("<I4xQQQ")
_NDATA = struct.Struct("<II")


class Page(Protocol):
    """What decode() reads of a kvm_run page (a pyhv.kvm.runpage.RunPage has it; runpage
    imports this module, not the other way round)."""

    @property
    def reason(self) -> int: ...
    @property
    def mm(self) -> mmap.mmap: ...


def decode(page: Page) -> Exit:
    """A fresh typed object for the current exit of `page` (allocates; for the slow paths)."""
    r = page.reason
    mm = page.mm
    if r == c.EXIT_IO:
        d, size, port, count, off = _IO.unpack_from(mm, _U)
        return IoExit(port, size, d == c.IO_OUT, count, off)
    if r == c.EXIT_MMIO:
        gpa, data, n, w = _MMIO.unpack_from(mm, _U)
        n = min(n, 8)
        return MmioExit(gpa, n, bool(w), data[:n])
    if r in (c.EXIT_X86_RDMSR, c.EXIT_X86_WRMSR):
        _err, reason, index, data = _MSR.unpack_from(mm, _U)
        return MsrExit(index, r == c.EXIT_X86_WRMSR, reason, data)
    if r == c.EXIT_DEBUG:
        return DebugExit(*_DEBUG.unpack_from(mm, _U))
    if r == c.EXIT_HLT:
        return HltExit()
    if r == c.EXIT_SHUTDOWN:
        return ShutdownExit()
    if r == c.EXIT_INTR:
        return IntrExit()
    if r == c.EXIT_INTERNAL_ERROR:
        sub, nd = _NDATA.unpack_from(mm, _U)
        nd = min(nd, 16)
        return InternalErrorExit(sub, struct.unpack_from(f"<{nd}Q", mm, _U + 8))
    if r == c.EXIT_SYSTEM_EVENT:
        typ, nd = _NDATA.unpack_from(mm, _U)
        nd = min(nd, 16)
        return SystemEventExit(typ, struct.unpack_from(f"<{nd}Q", mm, _U + 8))
    if r == c.EXIT_FAIL_ENTRY:
        reason, cpu = struct.unpack_from("<QI", mm, _U)
        return FailEntryExit(reason, cpu)
    return UnknownExit(r, bytes(mm[_U : _U + 256]))
