"""What the 32-bit entries (PVH and Multiboot) share: VP 0 in flat 32-bit protected mode with
paging off, set by the VMM through KVM_SET_SREGS (no real-mode trampoline), a GDT that
describes the segments loaded, and the low page range where the loaders put the boot structures
(docs/boot-protocol.md, "Other kernels")."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyhv.worker import boot
from pyhv.worker.boot import EntryState, GuestMemory, ImageError, Segment, Segmentation

# Guest-physical layout of the 32-bit boot structures (all below the first 12 KiB).
GDT_GPA = 0x500
INFO_GPA = 0x1000  # hvm_start_info or multiboot_info
MEMMAP_GPA = 0x1400  # the memory map the info block points at
LOADER_NAME_GPA = 0x1F00
CMDLINE_GPA = 0x2000
CMDLINE_MAX = 4095
BOOT_AREA = (GDT_GPA, CMDLINE_GPA + CMDLINE_MAX + 1)  # [start, end): no segment may overlap it
FOUR_GIB = 1 << 32

# Selectors of the 32-bit GDT.
CODE32_SEL, DATA32_SEL, TSS_SEL = 0x08, 0x10, 0x18
GDT32_ENTRIES = (
    0,  # 0x00 null
    boot.gdt_descriptor(0, 0xFFFFF, 0x9A, 0xC),  # 0x08 code, 32-bit, 4 GiB
    boot.gdt_descriptor(0, 0xFFFFF, 0x92, 0xC),  # 0x10 data, 32-bit, 4 GiB
    boot.gdt_descriptor(0, 0x67, 0x8B, 0x0),  # 0x18 busy 32-bit TSS at 0 (PVH wants one in TR)
)

CR0_PE, CR0_ET = 1, 1 << 4
CODE32 = Segmentation(selector=CODE32_SEL, type=0xB, db=1)
DATA32 = Segmentation(selector=DATA32_SEL, type=0x3, db=1)
TSS32 = Segmentation(selector=TSS_SEL, limit=0x67, type=0xB, s=0, g=0)


def build_gdt(mem: GuestMemory) -> int:
    raw = struct.pack(f"<{len(GDT32_ENTRIES)}Q", *GDT32_ENTRIES)
    mem.write(GDT_GPA, raw)
    return len(raw) - 1


def entry_state(rip: int, gdt_limit: int, *, rax: int = 0, rbx: int = 0) -> EntryState:
    """VP 0 at a 32-bit entry: CR0 = PE|ET (paging off), flat 4 GiB segments, interrupts off,
    no stack (both protocols leave ESP undefined: the kernel sets its own)."""
    return EntryState(
        rip=rip,
        rsp=0,
        rsi=0,
        rax=rax,
        rbx=rbx,
        cr0=CR0_PE | CR0_ET,
        cr3=0,
        cr4=0,
        efer=0,
        cs=CODE32,
        ds=DATA32,
        es=DATA32,
        ss=DATA32,
        fs=DATA32,
        gs=DATA32,
        gdt_base=GDT_GPA,
        gdt_limit=gdt_limit,
        tr=TSS32,
    )


def check_placement(
    segments: Sequence[Segment], entry: int, ram: Sequence[tuple[int, int]], *, name: str
) -> None:
    """Every segment inside RAM below 4 GiB and clear of the boot structures; the entry point
    inside a loaded segment."""
    lo, hi = BOOT_AREA
    top = max(base + size for base, size in ram)
    for s in segments:
        end = s.gpa + s.memsz
        if end > FOUR_GIB:
            raise ImageError(
                f"{name} segment {s.gpa:#x}-{end:#x} reaches above 4 GiB, which a 32-bit entry "
                "without paging cannot address: link it below 4 GiB"
            )
        if s.gpa < hi and lo < end:
            raise ImageError(
                f"{name} segment {s.gpa:#x}-{end:#x} overlaps the boot structures at "
                f"{lo:#x}-{hi:#x}: link it at 1 MiB (0x100000) or above"
            )
        if not any(base <= s.gpa and end <= base + size for base, size in ram):
            raise ImageError(
                f"{name} segment {s.gpa:#x}-{end:#x} is outside guest RAM (RAM ends at "
                f"{top:#x}): give the VM more memory or link the kernel lower"
            )
    if not any(s.gpa <= entry < s.gpa + s.memsz for s in segments):
        spans = ", ".join(f"{s.gpa:#x}-{s.gpa + s.memsz:#x}" for s in segments)
        raise ImageError(f"{name} entry point {entry:#x} is outside its loaded segments ({spans})")


def cmdline_bytes(cmdline: str, *, name: str) -> bytes:
    raw = cmdline.encode("utf-8")
    if len(raw) > CMDLINE_MAX or b"\0" in raw:
        raise ImageError(
            f"the command line for {name} is {len(raw)} bytes: at most {CMDLINE_MAX}, without NUL"
        )
    return raw


def load(mem: GuestMemory, segments: Sequence[Segment], entry: int) -> boot.Image:
    image = boot.Image(entry, tuple(segments))
    boot.load_image(mem, image)
    return image
