"""The reference guest's balloon floor (guest/pmm.c), which is Linux hv_balloon's."""

from __future__ import annotations

MiB_PAGES = 256


def floor_pages(ram_pages: int) -> int:
    """Linux hv_balloon's compute_balloon_floor(), in pages."""
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
