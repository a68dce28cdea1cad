"""Read an ELF32 or ELF64 x86 executable: its entry point, PT_LOAD segments (by physical
address) and the notes of its PT_NOTE segments, every offset checked against the file."""

from __future__ import annotations

import struct
from typing import NamedTuple

from pyhv.worker.boot import ImageError, Segment

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
PF_X = 1

# (header, program header) per class; field order: see parse_elf().
ELF32_HEADER = struct.Struct("<16sHHIIIIIHHHHHH")
ELF32_PHDR = struct.Struct("<IIIIIIII")
ELF64_HEADER = struct.Struct("<16sHHIQQQIHHHHHH")
ELF64_PHDR = struct.Struct("<IIQQQQQQ")
assert ELF32_HEADER.size == 52 and ELF32_PHDR.size == 32
assert ELF64_HEADER.size == 64 and ELF64_PHDR.size == 56
NOTE_HEADER = struct.Struct("<III")  # namesz, descsz, type


class Note(NamedTuple):
    name: bytes
    type: int
    desc: bytes


class ElfFile(NamedTuple):
    elf_class: int  # ELFCLASS32 or ELFCLASS64
    machine: int
    type: int
    entry: int
    segments: tuple[Segment, ...]  # PT_LOAD by physical address
    vaddrs: tuple[int, ...]  # each segment's virtual address
    notes: tuple[Note, ...]

    @property
    def bits(self) -> int:
        return 64 if self.elf_class == ELFCLASS64 else 32

    def note(self, name: bytes, note_type: int) -> Note | None:
        return next((n for n in self.notes if n.name == name and n.type == note_type), None)

    def loaded(self, gpa: int) -> Segment | None:
        """The segment whose memory holds `gpa`."""
        return next((s for s in self.segments if s.gpa <= gpa < s.gpa + s.memsz), None)


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def parse(data: bytes, *, name: str = "image") -> ElfFile:
    if not is_elf(data):
        raise ImageError(f"{name} is not an ELF file: it has no \\x7fELF header")
    if len(data) < 6:
        raise ImageError(f"{name} is truncated: its {len(data)} bytes end inside the ELF header")
    elf_class, encoding = data[4], data[5]
    if elf_class not in (ELFCLASS32, ELFCLASS64) or encoding != 1:
        raise ImageError(
            f"{name} is an ELF of class {elf_class}, data encoding {encoding}: only 32- or "
            "64-bit little-endian x86 ELF files boot"
        )
    header, phdr = (
        (ELF64_HEADER, ELF64_PHDR) if elf_class == ELFCLASS64 else (ELF32_HEADER, ELF32_PHDR)
    )
    if len(data) < header.size:
        raise ImageError(f"{name} is truncated: its {len(data)} bytes end inside the ELF header")
    _ident, e_type, machine, _v, entry, phoff, _sh, _fl, _ehs, phentsize, phnum, *_ = (
        header.unpack_from(data)
    )
    if machine not in (EM_386, EM_X86_64):
        raise ImageError(f"{name} is for ELF machine {machine}, not x86 ({EM_386} or {EM_X86_64})")
    if phentsize != phdr.size or not 0 < phnum <= 64:
        raise ImageError(
            f"{name} has {phnum} program headers of {phentsize} bytes: expected 1..64 of "
            f"{phdr.size}"
        )
    if phoff + phnum * phentsize > len(data):
        raise ImageError(
            f"{name} is truncated: its program headers end at byte {phoff + phnum * phentsize}, "
            f"beyond its {len(data)} bytes"
        )
    segments: list[Segment] = []
    vaddrs: list[int] = []
    notes: list[Note] = []
    for i in range(phnum):
        if elf_class == ELFCLASS64:
            p_type, flags, off, vaddr, paddr, filesz, memsz, _al = phdr.unpack_from(
                data, phoff + i * phentsize
            )
        else:
            p_type, off, vaddr, paddr, filesz, memsz, flags, _al = phdr.unpack_from(
                data, phoff + i * phentsize
            )
        if p_type not in (PT_LOAD, PT_NOTE):
            continue
        if off + filesz > len(data) or (p_type == PT_LOAD and filesz > memsz):
            raise ImageError(
                f"{name} is truncated or malformed: segment {i} has {filesz} bytes at file "
                f"offset {off:#x} (memory size {memsz}) but the file has {len(data)} bytes"
            )
        if p_type == PT_NOTE:
            notes += _notes(data[off : off + filesz], name)
        elif memsz:
            segments.append(Segment(paddr, data[off : off + filesz], memsz, bool(flags & PF_X)))
            vaddrs.append(vaddr)
    if not segments:
        raise ImageError(f"{name} has no PT_LOAD segment: nothing to load")
    return ElfFile(elf_class, machine, e_type, entry, tuple(segments), tuple(vaddrs), tuple(notes))


def _notes(raw: bytes, name: str) -> list[Note]:
    notes = []
    at = 0
    while at + NOTE_HEADER.size <= len(raw):
        namesz, descsz, note_type = NOTE_HEADER.unpack_from(raw, at)
        name_at = at + NOTE_HEADER.size
        desc_at = name_at + (namesz + 3) // 4 * 4
        end = desc_at + (descsz + 3) // 4 * 4
        if desc_at + descsz > len(raw):
            raise ImageError(
                f"{name} has a malformed ELF note: {namesz}+{descsz} bytes at note offset {at} "
                f"run past its PT_NOTE segment of {len(raw)} bytes"
            )
        notes.append(
            Note(
                raw[name_at : name_at + namesz].rstrip(b"\0"),
                note_type,
                raw[desc_at : desc_at + descsz],
            )
        )
        at = end
    return notes
