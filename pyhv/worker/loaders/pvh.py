"""The Xen PVH entry (Xen's docs/misc/pvh.pandoc and public/arch-x86/hvm/start_info.h), as QEMU's
`-kernel` boots an ELF with a PVH note: load the PT_LOAD segments at their physical addresses,
write an `hvm_start_info` (version 1: command line and memory map, no modules, no ACPI) and
start VP 0 at the XEN_ELFNOTE_PHYS32_ENTRY address in 32-bit protected mode, EBX = the info."""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pyhv.worker.boot import EntryState, GuestMemory, Image, ImageError
from pyhv.worker.loaders import elf, protected

XEN_ELFNOTE_PHYS32_ENTRY = 18
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
# magic, version, flags, nr_modules, modlist_paddr, cmdline_paddr, rsdp_paddr,
# memmap_paddr, memmap_entries, reserved
HVM_START_INFO = struct.Struct("<IIIIQQQQII")
HVM_MEMMAP_ENTRY = struct.Struct("<QQII")  # addr, size, type (E820), reserved
assert HVM_START_INFO.size == 56 and HVM_MEMMAP_ENTRY.size == 24
E820_RAM = 1


def entry_point(image: elf.ElfFile, *, name: str) -> int | None:
    """The PHYS32 entry of the image's PVH note (None without one)."""
    note = image.note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY)
    if note is None:
        return None
    if len(note.desc) not in (4, 8):
        raise ImageError(
            f"{name} has a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) of {len(note.desc)} bytes: "
            "expected a 4- or 8-byte address"
        )
    return int.from_bytes(note.desc, "little")


def start_info(ram: Sequence[tuple[int, int]]) -> tuple[bytes, bytes]:
    """The hvm_start_info and its memory map, to write at INFO_GPA and MEMMAP_GPA."""
    memmap = b"".join(HVM_MEMMAP_ENTRY.pack(b, s, E820_RAM, 0) for b, s in ram)
    info = HVM_START_INFO.pack(
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,
        0,
        0,
        protected.CMDLINE_GPA,
        0,
        protected.MEMMAP_GPA,
        len(ram),
        0,
    )
    return info, memmap


def prepare(
    mem: GuestMemory,
    image: elf.ElfFile,
    *,
    ram: Sequence[tuple[int, int]],
    cmdline: str,
    name: str,
) -> tuple[Image, EntryState]:
    entry = entry_point(image, name=name)
    if entry is None:
        raise ImageError(f"{name} has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY)")
    raw_cmdline = protected.cmdline_bytes(cmdline, name=name)
    protected.check_placement(image.segments, entry, ram, name=f"{name} (PVH)")
    gdt_limit = protected.build_gdt(mem)
    info, memmap = start_info(ram)
    mem.write(protected.INFO_GPA, info)
    mem.write(protected.MEMMAP_GPA, memmap)
    mem.write(protected.CMDLINE_GPA, raw_cmdline + b"\0")
    loaded = protected.load(mem, image.segments, entry)
    return loaded, protected.entry_state(entry, gdt_limit, rbx=protected.INFO_GPA)
