"""`RunPage`: the mmap'ed kvm_run page of a vCPU, read field by field on the VP loop's hot path.

`decode()` makes a typed exit object (pyhv.kvm.exits) for the slow paths; that module, with its
dataclasses, is imported only then, so starting a VM does not pay for it.
"""

from __future__ import annotations

import mmap
from typing import TYPE_CHECKING

from pyhv.kvm import constants as c
from pyhv.kvm.structs import RUN_UNION

if TYPE_CHECKING:
    from pyhv.kvm.exits import Exit

_U = RUN_UNION


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
        return self.i[2]

    @property
    def immediate_exit(self) -> bool:
        return bool(self.b[1])

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.b[1] = 1 if value else 0

    # io (fields read one by one on the hot path)
    def io_is_write(self) -> bool:
        return self.b[_U] == c.IO_OUT

    def io_size(self) -> int:
        return self.b[_U + 1]

    def io_port(self) -> int:
        return self.h[(_U + 2) // 2]

    def io_count(self) -> int:
        return self.i[(_U + 4) // 4]

    def io_data_offset(self) -> int:
        return self.q[(_U + 8) // 8]

    # mmio
    def mmio_gpa(self) -> int:
        return self.q[_U // 8]

    def mmio_len(self) -> int:
        return self.i[(_U + 16) // 4]

    def mmio_is_write(self) -> bool:
        return self.b[_U + 20] != 0

    def mmio_data(self, n: int) -> int:
        """The written value (little endian) of an n-byte MMIO write."""
        return int.from_bytes(self.b[_U + 8 : _U + 8 + n], "little")

    def set_mmio_data(self, value: int, n: int) -> None:
        self.b[_U + 8 : _U + 8 + n] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    # msr
    def msr_index(self) -> int:
        return self.i[(_U + 12) // 4]

    def msr_reason(self) -> int:
        return self.i[(_U + 8) // 4]

    def msr_data(self) -> int:
        return self.q[(_U + 16) // 8]

    def set_msr_result(self, data: int, error: bool) -> None:
        self.q[(_U + 16) // 8] = data & 0xFFFFFFFFFFFFFFFF
        self.b[_U] = 1 if error else 0

    def decode(self) -> Exit:
        """A fresh typed object for the current exit (allocates; for the slow paths)."""
        from pyhv.kvm.exits import decode

        return decode(self)
