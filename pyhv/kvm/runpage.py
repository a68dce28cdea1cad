"""`RunPage`: the mmap'ed kvm_run page of a vCPU, read field by field on the VP loop's hot path.

The hot path reads a field as `page.i[REASON]`, `page.h[IO_PORT]`: the module's constants are
each field's index in the view of its width (b: u8, h: u16, i: u32, q: u64), taken from the
ctypes layouts of struct kvm_run (pyhv.kvm.structs), so a read costs what a literal index does.
`decode()` makes a typed exit object (pyhv.kvm.exits) for the slow paths; that module, with its
dataclasses, is imported only then, so starting a VM does not pay for it.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from pyhv.kvm import constants as c
from pyhv.kvm.structs import (
    RUN_UNION,
    kvm_run_header,
    kvm_run_io,
    kvm_run_mmio,
    kvm_run_msr,
)

if TYPE_CHECKING:
    import ctypes

    from pyhv.kvm.exits import Exit


def _index(struct: type[ctypes.Structure], name: str, width: int, base: int = RUN_UNION) -> int:
    """The index of struct.name (at `base` in kvm_run) in the view of items of `width` bytes."""
    off = base + getattr(struct, name).offset
    if off % width:
        raise AssertionError(f"kvm_run field {name} at {off} is not {width}-byte aligned")
    return off // width


# header
IMMEDIATE_EXIT = _index(kvm_run_header, "immediate_exit", 1, 0)  # b
REASON = _index(kvm_run_header, "exit_reason", 4, 0)  # i
# KVM_EXIT_IO
IO_DIRECTION = _index(kvm_run_io, "direction", 1)  # b: c.IO_IN / c.IO_OUT
IO_SIZE = _index(kvm_run_io, "size", 1)  # b
IO_PORT = _index(kvm_run_io, "port", 2)  # h
IO_COUNT = _index(kvm_run_io, "count", 4)  # i
IO_DATA_OFFSET = _index(kvm_run_io, "data_offset", 8)  # q: the data's byte offset in the page
# KVM_EXIT_MMIO: the data (8 bytes) as b/h/i/q
MMIO_GPA = _index(kvm_run_mmio, "phys_addr", 8)  # q
MMIO_DATA = _index(kvm_run_mmio, "data", 1)  # b (a byte offset)
MMIO_DATA_H = _index(kvm_run_mmio, "data", 2)
MMIO_DATA_I = _index(kvm_run_mmio, "data", 4)
MMIO_DATA_Q = _index(kvm_run_mmio, "data", 8)
MMIO_LEN = _index(kvm_run_mmio, "len", 4)  # i
MMIO_IS_WRITE = _index(kvm_run_mmio, "is_write", 1)  # b
# KVM_EXIT_X86_RDMSR / WRMSR
MSR_ERROR = _index(kvm_run_msr, "error", 1)  # b: 1 = inject #GP
MSR_REASON = _index(kvm_run_msr, "reason", 4)  # i
MSR_INDEX = _index(kvm_run_msr, "index", 4)  # i
MSR_DATA = _index(kvm_run_msr, "data", 8)  # q


class RunPage:
    """The mmap'ed struct kvm_run of one vCPU, with fast typed views of it."""

    __slots__ = ("mm", "b", "h", "i", "q", "size")

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm = mm
        self.size = len(mm)
        view = memoryview(mm)
        self.b = view  # bytes
        self.h = view.cast("H")
        self.i = view.cast("I")
        self.q = view.cast("Q")

    def release(self) -> None:
        for v in (self.q, self.i, self.h, self.b):
            v.release()
        self.mm.close()

    # header
    @property
    def reason(self) -> int:
        return self.i[REASON]

    @property
    def immediate_exit(self) -> bool:
        return bool(self.b[IMMEDIATE_EXIT])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.b[IMMEDIATE_EXIT] = 1 if value else 0

    # io (fields read one by one on the hot path)
    def io_is_write(self) -> bool:
        return self.b[IO_DIRECTION] == c.IO_OUT

    def io_size(self) -> int:
        return self.b[IO_SIZE]

    def io_port(self) -> int:
        return self.h[IO_PORT]

    def io_count(self) -> int:
        return self.i[IO_COUNT]

    def io_data_offset(self) -> int:
        return self.q[IO_DATA_OFFSET]

    # mmio
    def mmio_gpa(self) -> int:
        return self.q[MMIO_GPA]

    def mmio_len(self) -> int:
        return self.i[MMIO_LEN]

    def mmio_is_write(self) -> bool:
        return self.b[MMIO_IS_WRITE] != 0

    def mmio_data(self, n: int) -> int:
        """The written value (little endian) of an n-byte MMIO write."""
        return int.from_bytes(self.b[MMIO_DATA : MMIO_DATA + n], "little")

    def set_mmio_data(self, value: int, n: int) -> None:
        self.b[MMIO_DATA : MMIO_DATA + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    # msr
    def msr_index(self) -> int:
        return self.i[MSR_INDEX]

    def msr_reason(self) -> int:
        return self.i[MSR_REASON]

    def msr_data(self) -> int:
        return self.q[MSR_DATA]

    def set_msr_result(self, data: int, error: bool) -> None:
        self.q[MSR_DATA] = data & 0xFFFFFFFFFFFFFFFF
        self.b[MSR_ERROR] = 1 if error else 0

    def decode(self) -> Exit:
        """A fresh typed object for the current exit (allocates; for the slow paths)."""
        from pyhv.kvm.exits import decode

        return decode(self)
