"""Fuzz target of the kernel image loaders (pyhv.worker.loaders: ELF, pyhv's direct boot, PVH,
Multiboot v1): an image's bytes loaded into guest RAM that checks every write lies inside it.
Seeds: a pyhv direct-boot ELF64, PVH ELFs of both classes (XEN_ELFNOTE_PHYS32_ENTRY note) and
Multiboot kernels (flat, by the header's address fields, and ELF)."""

from __future__ import annotations

import struct

from pyhv.worker import loaders
from pyhv.worker.boot import ImageError
from tests.support.fuzz import Target

MIB = 1 << 20
MEMORY = 64 * MIB
PT_LOAD, PT_NOTE = 1, 4
KERNEL = 0x100000


class CheckedMemory:
    """Guest RAM of MEMORY bytes that only checks where it is written."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, gpa: int, data: bytes) -> None:
        assert 0 <= gpa and gpa + len(data) <= MEMORY, f"write of {len(data)} at {gpa:#x}"
        self.written += len(data)


def load(data: bytes) -> None:
    mem = CheckedMemory()
    loaders.prepare(mem, data, memory=MEMORY, vp_count=1, cmdline="console=ttyS0", name="fuzz")


def elf(
    bits: int, entry: int, segments: list[tuple[int, bytes, int, int, int]], machine: int = 62
) -> bytes:
    """An ELF executable of `bits` with program headers (type, data, paddr, memsz, flags)."""
    if bits == 64:
        head, phdr = struct.Struct("<16sHHIQQQIHHHHHH"), struct.Struct("<IIQQQQQQ")
    else:
        head, phdr = struct.Struct("<16sHHIIIIIHHHHHH"), struct.Struct("<IIIIIIII")
    data_off = head.size + phdr.size * len(segments)
    phdrs, body = b"", b""
    for ptype, data, paddr, memsz, flags in segments:
        off = data_off + len(body)
        if bits == 64:
            phdrs += phdr.pack(ptype, flags, off, paddr, paddr, len(data), memsz, 0x1000)
        else:
            phdrs += phdr.pack(ptype, off, paddr, paddr, len(data), memsz, flags, 0x1000)
        body += data
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    hdr = head.pack(ident, 2, machine, 1, entry, head.size, 0, 0, head.size, phdr.size,
                    len(segments), 64 if bits == 64 else 40, 0, 0)  # fmt: skip
    return hdr + phdrs + body


def _pvh_note(entry: int) -> bytes:
    return struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", entry)


def _multiboot_flat() -> bytes:
    magic, flags = 0x1BADB002, 1 << 0 | 1 << 1 | 1 << 16
    code = b"\xf4" * 64  # hlt
    size = 32 + len(code)
    header = struct.pack(
        "<IIIIIIII",
        magic,
        flags,
        -(magic + flags) & 0xFFFFFFFF,
        KERNEL,  # header_addr: the header is the image's first byte
        KERNEL,  # load_addr
        KERNEL + size,  # load_end_addr
        KERNEL + size + 0x1000,  # bss_end_addr
        KERNEL + 32,  # entry_addr
    )
    return header + code


def seeds() -> list[bytes]:
    code = b"\x90" * 32 + b"\xf4"
    mb_magic, mb_flags = 0x1BADB002, 1 << 0 | 1 << 1
    mb_header = struct.pack("<III", mb_magic, mb_flags, -(mb_magic + mb_flags) & 0xFFFFFFFF)
    return [
        elf(64, KERNEL, [(PT_LOAD, code, KERNEL, 0x2000, 5)]),  # pyhv direct boot
        elf(64, KERNEL, [(PT_LOAD, code, KERNEL, 0x1000, 5), (PT_NOTE, _pvh_note(KERNEL + 8), 0, 0, 4)]),
        elf(32, KERNEL, [(PT_LOAD, code, KERNEL, 0x1000, 5), (PT_NOTE, _pvh_note(KERNEL), 0, 0, 4)],
            machine=3),
        elf(32, KERNEL, [(PT_LOAD, mb_header + code, KERNEL, 0x3000, 7)], machine=3),
        _multiboot_flat(),
    ]  # fmt: skip


LOADERS = Target(
    "loaders.image",
    "kernel image loaders: ELF, PVH, Multiboot (pyhv.worker.loaders.prepare)",
    seeds,
    load,
    (ImageError,),
    max_size=8192,
)

TARGETS = [LOADERS]
