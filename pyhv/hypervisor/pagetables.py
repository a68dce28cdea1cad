"""Guest virtual to guest physical translation: a walk of the guest's 4-level page tables."""

from __future__ import annotations

from collections.abc import Callable

_PRESENT = 1
_PS = 1 << 7
_ADDR = 0x000F_FFFF_FFFF_F000


class TranslationError(ValueError):
    """The guest's page tables do not map the address (the guest would take a #PF)."""


def translate(read: Callable[[int, int], bytes], cr3: int, gva: int) -> int:
    """GPA of `gva` under the page tables at `cr3` (4 KiB, 2 MiB and 1 GiB pages)."""
    if gva < 0 or gva >= 1 << 64:
        raise TranslationError(f"GVA {gva:#x} is not a 64-bit address")
    top = gva >> 47
    if top not in (0, 0x1FFFF):
        raise TranslationError(f"GVA {gva:#x} is not canonical (bits 63-47 must be equal)")
    table = cr3 & _ADDR
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        index = (gva >> shift) & 511
        entry = int.from_bytes(read(table + 8 * index, 8), "little")
        if not entry & _PRESENT:
            raise TranslationError(
                f"GVA {gva:#x}: level-{level} entry {index} at GPA {table + 8 * index:#x} "
                f"is not present ({entry:#x})"
            )
        if level in (3, 2) and entry & _PS:
            page_mask = (1 << shift) - 1
            return (entry & _ADDR & ~page_mask) | (gva & page_mask)
        table = entry & _ADDR
    return table | (gva & 0xFFF)
