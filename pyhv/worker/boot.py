"""Direct 64-bit boot (docs/boot-protocol.md): load the ELF image, build the GDT, the identity
map and the boot-information block in guest memory, and say what VP 0's registers are at entry.

Pure functions over a guest-memory object with ``write(gpa, data)``, so the byte layouts are
testable without KVM. They assume freshly created, zero-filled RAM (a new partition): nothing
is written that should be zero, so loading an image does not make its .bss resident.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple, Protocol

# Guest-physical layout at boot.
GDT_GPA = 0x500
BOOT_INFO_GPA = 0x1000
CMDLINE_GPA = 0x2000
PML4_GPA = 0x10000
PDPT_GPA = 0x11000
PD_GPA = 0x12000
PD_COUNT = 64  # one page directory per GiB: 0..64 GiB
STACK_BOTTOM = 0x52000
STACK_TOP = 0x80000
IMAGE_MIN_GPA = 0x100000
CMDLINE_MAX = 4095

# RAM layout: RAM stops at 3 GiB and continues at 4 GiB, keeping the IOAPIC (0xFEC00000) and
# LAPIC (0xFEE00000) addresses free.
LOW_RAM_END = 0xC000_0000
HIGH_RAM_BASE = 0x1_0000_0000

# Control registers at entry.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA = 1, 1 << 8, 1 << 10
ENTRY_CR0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG
ENTRY_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
ENTRY_EFER = EFER_LME | EFER_LMA | EFER_SCE

# Selectors of the boot GDT.
KERNEL_CS, KERNEL_DS, USER_DS, USER_CS = 0x10, 0x18, 0x2B, 0x33

BOOT_INFO_MAGIC = 0x56485950  # "PYHV"
BOOT_INFO_VERSION = 1
MEMMAP_MAX = 64
MEMMAP_RAM, MEMMAP_RESERVED = 1, 2
FLAG_DYNAMIC_MEMORY = 1 << 0

# Boot-information block: header (40 bytes) then memmap entries (24 bytes each).
BOOT_INFO_HEADER = struct.Struct("<IIIIQIIQ")
MEMMAP_ENTRY = struct.Struct("<QQII")
assert BOOT_INFO_HEADER.size == 40 and MEMMAP_ENTRY.size == 24

# ELF64 headers.
ELF_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF_PHDR = struct.Struct("<IIQQQQQQ")
assert ELF_HEADER.size == 64 and ELF_PHDR.size == 56
EM_X86_64 = 62
ET_EXEC = 2
PT_LOAD = 1
PF_X = 1


class GuestMemory(Protocol):
    def write(self, gpa: int, data: bytes) -> None: ...


class ImageError(ValueError):
    """The guest image cannot be booted; the message says why and what to do."""


class Segment(NamedTuple):
    gpa: int
    data: bytes
    memsz: int
    executable: bool


class Image(NamedTuple):
    entry: int
    segments: tuple[Segment, ...]

    @property
    def end(self) -> int:
        """First GPA above the image: RAM from here up is free for the guest."""
        return max(s.gpa + s.memsz for s in self.segments)


class Segmentation(NamedTuple):
    """One segment register as KVM_SET_SREGS takes it."""

    selector: int
    base: int = 0
    limit: int = 0xFFFFFFFF
    type: int = 0
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the KVM field's name
    g: int = 1
    unusable: int = 0


CODE64 = Segmentation(selector=KERNEL_CS, type=0xB, l=1)
DATA = Segmentation(selector=KERNEL_DS, type=0x3, db=1)
NULL_SEGMENT = Segmentation(selector=0, limit=0, type=0, present=0, s=0, g=0, unusable=1)


class EntryState(NamedTuple):
    """VP 0's registers at the 64-bit entry point."""

    rip: int
    rsp: int = STACK_TOP
    rsi: int = BOOT_INFO_GPA
    rflags: int = 0x2
    cr0: int = ENTRY_CR0
    cr3: int = PML4_GPA
    cr4: int = ENTRY_CR4
    efer: int = ENTRY_EFER
    cs: Segmentation = CODE64
    ds: Segmentation = DATA
    es: Segmentation = DATA
    ss: Segmentation = DATA
    fs: Segmentation = NULL_SEGMENT
    gs: Segmentation = NULL_SEGMENT
    gdt_base: int = GDT_GPA
    gdt_limit: int = 0  # set from the GDT built
    idt_base: int = 0
    idt_limit: int = 0


def ram_regions(size: int) -> list[tuple[int, int]]:
    """Where ``size`` bytes of RAM go in the GPA space: (base, size) pairs."""
    if size <= LOW_RAM_END:
        return [(0, size)]
    return [(0, LOW_RAM_END), (HIGH_RAM_BASE, size - LOW_RAM_END)]


def parse_elf(data: bytes, *, name: str = "image") -> Image:
    """Read the entry point and PT_LOAD segments of an ELF64 x86-64 executable."""
    if len(data) < ELF_HEADER.size or data[:4] != b"\x7fELF":
        raise ImageError(
            f"{name} is not an ELF file (no \\x7fELF magic): give the pyhv-guest.elf image"
        )
    ident, e_type, machine, _ver, entry, phoff, _sh, _fl, _ehs, phentsize, phnum, *_ = (
        ELF_HEADER.unpack_from(data)
    )
    if ident[4] != 2 or ident[5] != 1:
        raise ImageError(
            f"{name} is not a 64-bit little-endian ELF (class {ident[4]}, data {ident[5]})"
        )
    if machine != EM_X86_64:
        raise ImageError(f"{name} is for ELF machine {machine}, not x86-64 ({EM_X86_64})")
    if e_type != ET_EXEC:
        raise ImageError(
            f"{name} has ELF type {e_type}, not an executable ({ET_EXEC}): link it static"
        )
    if phentsize != ELF_PHDR.size or phnum == 0 or phnum > 64:
        raise ImageError(
            f"{name} has {phnum} program headers of {phentsize} bytes: expected 1..64 of 56"
        )
    if phoff + phnum * phentsize > len(data):
        raise ImageError(f"{name} is truncated: program headers end beyond its {len(data)} bytes")
    segments = []
    for i in range(phnum):
        p_type, flags, off, _vaddr, paddr, filesz, memsz, _al = ELF_PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz or off + filesz > len(data):
            raise ImageError(
                f"{name} segment {i} is malformed: {filesz} bytes at file offset {off:#x}, "
                f"memory size {memsz}, file size {len(data)}"
            )
        segments.append(Segment(paddr, data[off : off + filesz], memsz, bool(flags & PF_X)))
    if not segments:
        raise ImageError(f"{name} has no PT_LOAD segment: nothing to load")
    image = Image(entry, tuple(segments))
    if not any(s.executable and s.gpa <= entry < s.gpa + s.memsz for s in segments):
        raise ImageError(f"{name} entry point {entry:#x} is not inside an executable segment")
    return image


def check_placement(image: Image, ram: Sequence[tuple[int, int]], *, name: str = "image") -> None:
    """Every segment must lie inside RAM and above the boot structures."""
    for s in image.segments:
        end = s.gpa + s.memsz
        if s.gpa < IMAGE_MIN_GPA:
            raise ImageError(
                f"{name} loads {s.memsz} bytes at {s.gpa:#x}, below {IMAGE_MIN_GPA:#x} where the boot "
                "structures live: link it at 1 MiB or above"
            )
        if not any(base <= s.gpa and end <= base + size for base, size in ram):
            top = max(base + size for base, size in ram)
            raise ImageError(
                f"{name} segment {s.gpa:#x}-{end:#x} is outside guest RAM (RAM ends at {top:#x}): "
                "give the VM more memory or link the image lower"
            )


def load_image(mem: GuestMemory, image: Image) -> None:
    for s in image.segments:
        if s.data:
            mem.write(s.gpa, s.data)


def gdt_descriptor(base: int, limit: int, access: int, flags: int) -> int:
    return (
        (limit & 0xFFFF)
        | (base & 0xFFFFFF) << 16
        | (access & 0xFF) << 40
        | ((limit >> 16) & 0xF) << 48
        | (flags & 0xF) << 52
        | ((base >> 24) & 0xFF) << 56
    )


# Access bytes: present | DPL | code/data | type. Flags: G | L (code) or G | D/B (data).
GDT_ENTRIES = (
    0,  # 0x00 null
    0,  # 0x08 unused
    gdt_descriptor(0, 0xFFFFF, 0x9A, 0xA),  # 0x10 kernel code, 64-bit
    gdt_descriptor(0, 0xFFFFF, 0x92, 0xC),  # 0x18 kernel data
    0,  # 0x20 unused
    gdt_descriptor(0, 0xFFFFF, 0xF2, 0xC),  # 0x28 user data, DPL3
    gdt_descriptor(0, 0xFFFFF, 0xFA, 0xA),  # 0x30 user code, 64-bit, DPL3
)


def build_gdt(mem: GuestMemory) -> int:
    """Write the boot GDT; returns its limit."""
    raw = struct.pack(f"<{len(GDT_ENTRIES)}Q", *GDT_ENTRIES)
    mem.write(GDT_GPA, raw)
    return len(raw) - 1


PTE_PRESENT, PTE_WRITABLE, PTE_LARGE = 1, 2, 0x80


def page_tables() -> bytes:
    """PML4, PDPT and 64 page directories identity-mapping 0..64 GiB with 2 MiB pages,
    as one blob to write at PML4_GPA."""
    pml4 = struct.pack("<Q", PDPT_GPA | PTE_PRESENT | PTE_WRITABLE).ljust(4096, b"\0")
    pdpt = struct.pack(
        f"<{PD_COUNT}Q",
        *(PD_GPA + i * 4096 | PTE_PRESENT | PTE_WRITABLE for i in range(PD_COUNT)),
    ).ljust(4096, b"\0")
    leaf = PTE_PRESENT | PTE_WRITABLE | PTE_LARGE
    pds = struct.pack(f"<{PD_COUNT * 512}Q", *range(leaf, (PD_COUNT << 30) + leaf, 2 << 20))
    return pml4 + pdpt + pds


def build_page_tables(mem: GuestMemory) -> None:
    mem.write(PML4_GPA, page_tables())


class BootInfo(NamedTuple):
    vp_count: int
    memmap: tuple[tuple[int, int, int], ...]  # (base, size, type)
    cmdline: bytes = b""
    flags: int = 0
    tsc_khz: int = 0

    def pack(self) -> bytes:
        if len(self.memmap) > MEMMAP_MAX:
            raise ValueError(f"{len(self.memmap)} memory-map entries: at most {MEMMAP_MAX} fit")
        if len(self.cmdline) > CMDLINE_MAX or b"\0" in self.cmdline:
            raise ValueError(
                f"command line of {len(self.cmdline)} bytes: at most {CMDLINE_MAX}, without NUL"
            )
        head = BOOT_INFO_HEADER.pack(
            BOOT_INFO_MAGIC,
            BOOT_INFO_VERSION,
            self.vp_count,
            len(self.memmap),
            CMDLINE_GPA if self.cmdline else 0,
            len(self.cmdline),
            self.flags,
            self.tsc_khz,
        )
        return head + b"".join(MEMMAP_ENTRY.pack(b, s, t, 0) for b, s, t in self.memmap)


def write_boot_info(mem: GuestMemory, info: BootInfo) -> None:
    mem.write(BOOT_INFO_GPA, info.pack())
    if info.cmdline:
        mem.write(CMDLINE_GPA, info.cmdline + b"\0")


def prepare(
    mem: GuestMemory,
    image_bytes: bytes,
    *,
    memory: int,
    vp_count: int,
    cmdline: str = "",
    flags: int = 0,
    tsc_khz: int = 0,
    name: str = "image",
) -> tuple[Image, EntryState]:
    """Everything the direct boot writes into guest memory; returns VP 0's entry state."""
    ram = ram_regions(memory)
    image = parse_elf(image_bytes, name=name)
    check_placement(image, ram, name=name)
    gdt_limit = build_gdt(mem)
    build_page_tables(mem)
    info = BootInfo(
        vp_count=vp_count,
        memmap=tuple((b, s, MEMMAP_RAM) for b, s in ram),
        cmdline=cmdline.encode("utf-8"),
        flags=flags,
        tsc_khz=tsc_khz,
    )
    write_boot_info(mem, info)
    load_image(mem, image)
    return image, EntryState(rip=image.entry, gdt_limit=gdt_limit)
