"""Start a VP directly in 64-bit long mode: identity page tables, a GDT, segments via SREGS.

The layout follows docs/boot-protocol.md: GDT at 0x500 with Linux's selectors (kernel CS 0x10,
DS 0x18, user DS 0x2b, user CS 0x33), PML4 at 0x10000, PDPT at 0x11000, page directories after it.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from pyhv.hypervisor.registers import DescriptorTable, Registers, Segment

if TYPE_CHECKING:
    from pyhv.hypervisor.partition import Partition
    from pyhv.hypervisor.vp import VirtualProcessor

GDT_GPA = 0x500
PML4_GPA = 0x10000
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS = 0x10, 0x18, 0x2B, 0x33

_GDT = [
    0,
    0,
    0x00AF9B000000FFFF,  # 0x10 kernel code, 64-bit
    0x00CF93000000FFFF,  # 0x18 kernel data
    0,
    0x00CFF3000000FFFF,  # 0x28 user data (0x2b)
    0x00AFFB000000FFFF,  # 0x30 user code, 64-bit (0x33)
]

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 0x10, 0x20, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA = 1, 1 << 8, 1 << 10


def write_page_tables(partition: Partition, gib: int = 4, user: bool = True) -> int:
    """Identity-map 0..gib GiB with 2 MiB pages at PML4_GPA; returns CR3.

    `user` sets the U bit so CPL3 code can use the mapping too.
    """
    if not 1 <= gib <= 512:
        raise ValueError(f"can map 1-512 GiB, not {gib}")
    u = 4 if user else 0
    pdpt = PML4_GPA + 0x1000
    partition.write(PML4_GPA, struct.pack("<Q", pdpt | 3 | u))
    partition.write(
        pdpt, struct.pack(f"<{gib}Q", *((pdpt + 0x1000 * (j + 1)) | 3 | u for j in range(gib)))
    )
    for j in range(gib):
        pd = pdpt + 0x1000 * (j + 1)
        partition.write(
            pd, struct.pack("<512Q", *(((j << 30) | (i << 21)) | 0x83 | u for i in range(512)))
        )
    return PML4_GPA


def _code(dpl: int) -> Segment:
    return Segment(0, 0xFFFFFFFF, USER_CS if dpl else KERNEL_CS, 11, 1, dpl, 0, 1, 1, 1)


def _data(dpl: int) -> Segment:
    return Segment(0, 0xFFFFFFFF, USER_DS if dpl else KERNEL_DS, 3, 1, dpl, 1, 1, 0, 1)


def enter_long_mode(
    partition: Partition,
    vp: VirtualProcessor,
    rip: int,
    rsp: int,
    cpl: int = 0,
    rflags: int = 0x2,
    gib: int = 4,
    **gprs: int,
) -> None:
    """Write page tables and GDT into guest memory and set the VP to run at `rip` in long mode.

    `cpl=3` starts it in user mode directly; give `rflags=0x3002` (IOPL 3) if that code does port
    I/O (reference/kvm-here.md: IOPL set by a guest IRET does not survive under PVM).
    """
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")
    cr3 = write_page_tables(partition, gib)
    partition.write(GDT_GPA, struct.pack(f"<{len(_GDT)}Q", *_GDT))
    sr = vp.special_registers
    sr.cr3 = cr3
    sr.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sr.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sr.efer = EFER_SCE | EFER_LME | EFER_LMA
    sr.gdt = DescriptorTable(GDT_GPA, 8 * len(_GDT) - 1)
    sr.cs = _code(cpl)
    sr.ds = sr.es = sr.fs = sr.gs = sr.ss = _data(cpl)
    vp.special_registers = sr
    regs = Registers(rip=rip, rsp=rsp, rflags=rflags)
    for name, value in gprs.items():
        setattr(regs, name, value)
    vp.registers = regs
    vp.make_runnable()  # an AP would otherwise wait for INIT/SIPI
