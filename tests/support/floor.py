"""The reference guest's balloon floor (guest/pmm.c): Linux hv_balloon's formula, of the guest's
RAM less its balloon but never of more than its boot RAM (hot-added memory does not raise it)."""

from __future__ import annotations

MiB_PAGES = 256


def floor_pages(ram_pages: int, boot_pages: int | None = None) -> int:
    """Linux hv_balloon's compute_balloon_floor() of `ram_pages`, in pages; with `boot_pages`,
    the reference guest's: of at most its boot RAM (docs/guest-vsc.md, "The floor")."""
    if boot_pages is not None:
        ram_pages = min(ram_pages, boot_pages)
    mb = MiB_PAGES
    if ram_pages < 128 * mb:
        return 8 * mb + ram_pages // 2
    if ram_pages < 512 * mb:
        return 40 * mb + ram_pages // 4
    if ram_pages < 2048 * mb:
        return 104 * mb + ram_pages // 8
    if ram_pages < 8192 * mb:
        return 232 * mb + ram_pages // 16
    return 488 * mb + ram_pages // 32
