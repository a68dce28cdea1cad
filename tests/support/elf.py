"""Hand-made ELF64 images for the loader tests: PT_LOAD segments exactly as a test asks for,
including ones a real linker would never write."""

from __future__ import annotations

import struct


def make_elf(
    segments: list[tuple[int, bytes, int, int]],
    entry: int,
    machine: int = 62,
    e_type: int = 2,
) -> bytes:
    """An ELF64 with PT_LOAD segments given as (paddr, data, memsz, flags)."""
    phoff = 64
    data_off = phoff + 56 * len(segments)
    phdrs = b""
    body = b""
    for paddr, data, memsz, flags in segments:
        phdrs += struct.pack(
            "<IIQQQQQQ", 1, flags, data_off + len(body), paddr, paddr, len(data), memsz, 0x1000
        )
        body += data
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    head = struct.pack(
        "<16sHHIQQQIHHHHHH",
        ident,
        e_type,
        machine,
        1,
        entry,
        phoff,
        0,
        0,
        64,
        56,
        len(segments),
        64,
        0,
        0,
    )
    return head + phdrs + body
