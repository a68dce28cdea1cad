"""The source's page scans (pyhv.migration.memory): a page counts as zero only if all its 512
words are, whether the data sits in its first word, its last, or nowhere, and across the zero
scan's 16 MiB chunks; runs of set bits are found at both ends of a mask and between; the few
pages of a final pass (Python, no numpy) come out as the numpy path finds them."""

from __future__ import annotations

import numpy as np
import pytest

from pyhv.migration.memory import nonzero_pages

pytestmark = pytest.mark.unit


def test_a_page_is_zero_only_if_every_word_is() -> None:
    rng = np.random.default_rng(13)
    arr = np.zeros((10_000, 512), dtype=np.uint64)
    pages = rng.integers(0, 10_000, 3_000)
    words = rng.integers(0, 512, 3_000)
    arr[pages, words] = rng.integers(1, 2**63, 3_000, dtype=np.uint64)
    arr[7, 511] = 1  # only the last word
    arr[8, 0] = 1  # only the first
    for first, end in [(0, 10_000), (5, 9_000), (4_095, 4_097), (3, 3)]:
        want = arr[first:end].any(axis=1)
        assert (nonzero_pages(arr, first, end) == want).all(), (first, end)
    assert nonzero_pages(arr, 7, 9).tolist() == [True, True]
    assert nonzero_pages(np.zeros((5, 512), dtype=np.uint64), 0, 5).tolist() == [False] * 5


def test_runs_of_set_pages_are_found_at_both_ends_and_between() -> None:
    from pyhv.migration.memory import runs

    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 3, 17, 4096):
        for p in (0.0, 0.1, 0.5, 0.9, 1.0):
            mask = rng.random(n) < p
            want, start = [], None
            for i, bit in enumerate([*mask.tolist(), False]):
                if bit and start is None:
                    start = i
                elif not bit and start is not None:
                    want.append((start, i))
                    start = None
            assert runs(mask) == want, (n, p)


def _numpy_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyhv.migration import memory

    monkeypatch.setattr(memory, "FEW_PAGES", -1)


def test_a_final_pass_few_pages_come_out_as_the_numpy_path_finds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pyhv.migration import memory as mem

    class Region:  # what dirty_pages reads of a MemoryRegion
        def __init__(self, bitmap: bytes, pages: int) -> None:
            self.bitmap, self.pages = bitmap, pages

        def dirty_bitmap(self) -> bytes:
            return self.bitmap

    rng = np.random.default_rng(17)
    ram = np.zeros((64, 512), dtype=np.uint64)
    ram[rng.integers(0, 64, 20), rng.integers(0, 512, 20)] = 1
    view = memoryview(ram.view(np.uint8).reshape(-1))
    cases = []
    for _ in range(300):
        pages = int(rng.integers(1, 200))
        bits = np.zeros((pages + 63) // 64 * 64, dtype=bool)
        bits[rng.integers(0, bits.size, int(rng.integers(0, 12)))] = True  # some past `pages`
        before = np.unique(rng.integers(0, pages, int(rng.integers(0, 8))))
        first = int(rng.integers(0, 60))
        end = first + int(rng.integers(0, min(mem.FEW_PAGES, 64 - first) + 1))
        region = Region(np.packbits(bits, bitorder="little").tobytes(), pages)
        cases.append((region, before, first, end))

    def scan() -> list[object]:
        out: list[object] = []
        for region, before, first, end in cases:
            found = mem.dirty_pages(region)
            both = mem.union(before, found)
            out.append((found.tolist(), both.tolist(), mem.index_runs(both)))
            out.append((mem.runs(both % 2 == 0), mem.zero_split(view, ram, first, end)))
        return out

    few = scan()
    _numpy_only(monkeypatch)
    assert few == scan()
