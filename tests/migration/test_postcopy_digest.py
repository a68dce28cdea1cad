"""The post-copy RAM digest: the destination adds up pages it kept and pages it installed, in
any order, and must reach the source's figure for RAM at the pause."""

from __future__ import annotations

import numpy as np
import pytest

from pyhv.migration.postcopy import digest, percentiles

pytestmark = pytest.mark.unit
PAGE = 4096


def _ram(pages: int, seed: int = 1) -> bytearray:
    return bytearray(np.random.default_rng(seed).integers(0, 256, pages * PAGE, dtype=np.uint8))


def test_the_digest_of_ram_is_the_sum_of_its_parts_in_any_order() -> None:
    ram = _ram(2100)  # more than one numpy chunk
    whole = digest(0x100000, ram)
    parts = [(0, 7), (1500, 2100), (7, 1500)]
    added = sum(digest(0x100000 + a * PAGE, ram[a * PAGE : b * PAGE]) for a, b in parts)
    assert added % (1 << 64) == whole


def test_a_zero_page_counts_nothing_and_any_change_shows() -> None:
    ram = _ram(8)
    ram[3 * PAGE : 4 * PAGE] = bytes(PAGE)
    without = digest(0, ram[: 3 * PAGE]) + digest(4 * PAGE, ram[4 * PAGE :])
    assert digest(0, ram) == without % (1 << 64)  # zero page: 0, wherever it is
    flipped = bytearray(ram)
    flipped[5 * PAGE + 100] ^= 1
    assert digest(0, flipped) != digest(0, ram)
    assert digest(PAGE, ram) != digest(0, ram)  # the same bytes elsewhere are other RAM
    swapped = bytearray(ram)
    swapped[0:PAGE], swapped[PAGE : 2 * PAGE] = ram[PAGE : 2 * PAGE], ram[0:PAGE]
    assert digest(0, swapped) != digest(0, ram)


def test_blocktime_percentiles() -> None:
    assert percentiles([]) == (0.0, 0.0, 0.0)
    p50, p99, mx = percentiles([float(i) for i in range(1, 101)])
    assert p50 == 50.5 and 99 <= p99 <= 100 and mx == 100
