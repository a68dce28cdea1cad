"""Multiboot v1 (the Multiboot Specification 0.6.96), as QEMU's `-kernel` boots it: find the
header in the first 8 KiB, load the kernel by its a.out-kludge address fields (flag bit 16) or
else as a 32-bit ELF, write a `multiboot_info` (memory sizes, command line, memory map, boot
loader name) and start VP 0 in 32-bit protected mode with EAX = 0x2BADB002, EBX = the info."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import NamedTuple

from pyhv.worker.boot import EntryState, GuestMemory, Image, ImageError, Segment
from pyhv.worker.loaders import elf, protected

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH = 8192  # the header lies, 4-byte aligned, within the first 8 KiB
# magic, flags, checksum, then with flag bit 16: header_addr, load_addr, load_end_addr,
# bss_end_addr, entry_addr
HEADER = struct.Struct("<III")
ADDRESSES = struct.Struct("<IIIII")
FLAG_PAGE_ALIGN, FLAG_MEMORY_INFO, FLAG_VIDEO_MODE, FLAG_ADDRESSES = 1, 2, 4, 1 << 16
KNOWN_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE  # bits 0-15 we honour

# multiboot_info: flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr,
# syms[4], mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name,
# apm_table, vbe_control_info, vbe_mode_info; vbe_mode, vbe_interface_seg/off/len (u16).
INFO = struct.Struct("<20I4H")
MMAP_ENTRY = struct.Struct("<IQQI")  # size (20: the bytes after this field), base, length, type
assert INFO.size == 88 and MMAP_ENTRY.size == 24
INFO_MEMORY, INFO_CMDLINE, INFO_MMAP, INFO_LOADER_NAME = 1, 1 << 2, 1 << 6, 1 << 9
MMAP_RAM = 1
LOADER_NAME = b"pyhv"
LOW_MEMORY_END = 0xA0000  # mem_lower counts at most 640 KiB
UPPER_MEMORY = 0x100000  # mem_upper counts from 1 MiB


class Header(NamedTuple):
    offset: int  # in the file
    flags: int


def find_header(data: bytes, *, name: str = "image") -> Header | None:
    """The first Multiboot header with a good checksum; an ImageError if the magic is there but
    no checksum matches; None if there is no magic."""
    bad = None
    for at in range(0, min(len(data), SEARCH) - HEADER.size + 1, 4):
        magic, flags, checksum = HEADER.unpack_from(data, at)
        if magic != HEADER_MAGIC:
            continue
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return Header(at, flags)
        bad = bad if bad is not None else (at, flags, checksum)
    if bad is not None:
        at, flags, checksum = bad
        want = -(HEADER_MAGIC + flags) & 0xFFFFFFFF
        raise ImageError(
            f"{name} has a Multiboot header at offset {at:#x} with a bad checksum {checksum:#010x} "
            f"(flags {flags:#x} need {want:#010x}): fix the header's checksum"
        )
    return None


def load_segments(data: bytes, header: Header, *, name: str) -> tuple[tuple[Segment, ...], int]:
    """The kernel's segments and entry point, from the address fields or from its ELF."""
    unknown = header.flags & 0xFFFF & ~KNOWN_REQUIRED
    if unknown:
        raise ImageError(
            f"{name} asks for Multiboot features pyhv does not provide (flag bits {unknown:#x}): "
            "only bits 0-2 and 16 are known"
        )
    if header.flags & FLAG_ADDRESSES:
        return _aout_kludge(data, header, name=name)
    if not elf.is_elf(data):
        raise ImageError(
            f"{name} has a Multiboot header without address fields (flag bit 16) and is not an "
            "ELF: set bit 16 and the load addresses, or link it as a 32-bit ELF"
        )
    image = elf.parse(data, name=name)
    if image.elf_class != elf.ELFCLASS32:
        raise ImageError(
            f"{name} is a 64-bit ELF with a Multiboot header but no address fields (flag bit "
            "16): Multiboot v1 loads 32-bit ELF kernels (link it as elf32-i386) or the address "
            "fields' flat image"
        )
    entry = image.entry
    if image.loaded(entry) is None:  # a virtual entry: find it through the segments' vaddrs
        for s, vaddr in zip(image.segments, image.vaddrs, strict=True):
            if vaddr <= entry < vaddr + s.memsz:
                entry = s.gpa + (entry - vaddr)
                break
    return image.segments, entry


def _aout_kludge(data: bytes, header: Header, *, name: str) -> tuple[tuple[Segment, ...], int]:
    at = header.offset + HEADER.size
    if at + ADDRESSES.size > len(data):
        raise ImageError(
            f"{name} is truncated: its Multiboot header at offset {header.offset:#x} ends "
            f"before its address fields"
        )
    header_addr, load_addr, load_end, bss_end, entry = ADDRESSES.unpack_from(data, at)
    start = header.offset - (header_addr - load_addr)
    if load_addr > header_addr or start < 0:
        raise ImageError(
            f"{name}'s Multiboot address fields are malformed: load_addr {load_addr:#x} and "
            f"header_addr {header_addr:#x} put the load start before the file's first byte"
        )
    if load_end == 0:
        size = len(data) - start
    elif load_end <= load_addr:
        raise ImageError(
            f"{name}'s Multiboot load_end_addr {load_end:#x} is not above load_addr {load_addr:#x}"
        )
    else:
        size = load_end - load_addr
    if start + size > len(data):
        raise ImageError(
            f"{name} is truncated: its Multiboot header loads {size} bytes from file offset "
            f"{start:#x}, but the file has {len(data)} bytes"
        )
    memsz = size
    if bss_end:
        if bss_end < load_addr + size:
            raise ImageError(
                f"{name}'s Multiboot bss_end_addr {bss_end:#x} is below the end of the loaded "
                f"text and data at {load_addr + size:#x}"
            )
        memsz = bss_end - load_addr
    return (Segment(load_addr, data[start : start + size], memsz, True),), entry


def info_blocks(ram: Sequence[tuple[int, int]]) -> tuple[bytes, bytes]:
    """The multiboot_info and its memory map, to write at INFO_GPA and MEMMAP_GPA."""
    low = next((size for base, size in ram if base == 0), 0)
    mem_lower = min(low, LOW_MEMORY_END) // 1024
    mem_upper = max(0, low - UPPER_MEMORY) // 1024
    mmap = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, b, s, MMAP_RAM) for b, s in ram)
    fields = [0] * 20
    fields[0] = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME
    fields[1], fields[2] = mem_lower, mem_upper
    fields[4] = protected.CMDLINE_GPA
    fields[11], fields[12] = len(mmap), protected.MEMMAP_GPA
    fields[16] = protected.LOADER_NAME_GPA
    return INFO.pack(*fields, 0, 0, 0, 0), mmap


def prepare(
    mem: GuestMemory,
    data: bytes,
    header: Header,
    *,
    ram: Sequence[tuple[int, int]],
    cmdline: str,
    path: str,
    name: str,
) -> tuple[Image, EntryState]:
    # Like GRUB and QEMU, the command line starts with the kernel's path.
    line = protected.cmdline_bytes(f"{path} {cmdline}" if cmdline else path, name=name)
    segments, entry = load_segments(data, header, name=name)
    protected.check_placement(segments, entry, ram, name=f"{name} (Multiboot)")
    gdt_limit = protected.build_gdt(mem)
    info, mmap = info_blocks(ram)
    mem.write(protected.INFO_GPA, info)
    mem.write(protected.MEMMAP_GPA, mmap)
    mem.write(protected.LOADER_NAME_GPA, LOADER_NAME + b"\0")
    mem.write(protected.CMDLINE_GPA, line + b"\0")
    image = protected.load(mem, segments, entry)
    return image, protected.entry_state(
        entry, gdt_limit, rax=BOOTLOADER_MAGIC, rbx=protected.INFO_GPA
    )
