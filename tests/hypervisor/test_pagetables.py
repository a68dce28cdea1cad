"""The root translates guest virtual addresses by walking the guest's own page tables."""

from __future__ import annotations

import struct

import pytest

from pyhv.hypervisor import TranslationError
from pyhv.hypervisor.pagetables import translate
from tests.guests.harness import guest, run_until_power_off

pytestmark = pytest.mark.unit


class Memory(dict[int, int]):
    """Sparse guest memory of 8-byte entries."""

    def entry(self, gpa: int, value: int) -> None:
        self[gpa] = value

    def read(self, gpa: int, n: int) -> bytes:
        assert n == 8 and gpa % 8 == 0
        return struct.pack("<Q", self.get(gpa, 0))


P, RW, PS = 1, 2, 0x80


@pytest.fixture
def mem() -> Memory:
    m = Memory()
    m.entry(0x1000 + 8 * 1, 0x2000 | P | RW)  # PML4[1] -> PDPT at 0x2000 (GVA 0x80_0000_0000)
    m.entry(0x2000 + 8 * 0, 0x40000000 | P | PS)  # 1 GiB page -> 1 GiB
    m.entry(0x2000 + 8 * 1, 0x3000 | P)  # PD at 0x3000
    m.entry(0x3000 + 8 * 2, 0x600000 | P | PS)  # 2 MiB page
    m.entry(0x3000 + 8 * 3, 0x4000 | P)  # PT at 0x4000
    m.entry(0x4000 + 8 * 5, 0x7000 | P)  # 4 KiB page
    return m


def test_a_gva_in_a_1_gib_page_translates(mem: Memory) -> None:
    assert translate(mem.read, 0x1000, 0x80_0012_3456) == 0x4012_3456


def test_a_gva_in_a_2_mib_page_translates(mem: Memory) -> None:
    gva = 0x80_0000_0000 + (1 << 30) + (2 << 21) + 0x1_2345
    assert translate(mem.read, 0x1000, gva) == 0x600000 + 0x1_2345


def test_a_gva_in_a_4_kib_page_translates(mem: Memory) -> None:
    gva = 0x80_0000_0000 + (1 << 30) + (3 << 21) + (5 << 12) + 0xABC
    assert translate(mem.read, 0x1000, gva) == 0x7ABC


def test_an_unmapped_gva_says_which_level_is_missing(mem: Memory) -> None:
    with pytest.raises(TranslationError, match="level-4 entry 0"):
        translate(mem.read, 0x1000, 0x1234)
    with pytest.raises(TranslationError, match="level-1 entry 6"):
        translate(mem.read, 0x1000, 0x80_0000_0000 + (1 << 30) + (3 << 21) + (6 << 12))


def test_a_non_canonical_gva_is_refused(mem: Memory) -> None:
    with pytest.raises(TranslationError, match="not canonical"):
        translate(mem.read, 0x1000, 0x0000_8000_0000_0000)


@pytest.mark.guest
def test_the_root_translates_a_mapping_the_running_guest_made_in_its_own_page_tables() -> None:
    """tests/guests/map_page.S maps GVA 0x80_0060_5000 to GPA 0x9a5000 in 4 KiB pages and
    writes through it; the root walks the tables from the VP's CR3 to the same GPA."""
    with guest("map_page") as (p, vp, _):
        run_until_power_off(p, vp)
        cr3 = vp.special_registers.cr3
        assert p.translate(cr3, 0x80_0060_5123) == 0x9A5123
        assert p.read(0x9A5123, 4) == (0x7AB1E5).to_bytes(4, "little")
        with pytest.raises(TranslationError):
            p.translate(cr3, 0x80_0060_6000)  # PT[6]: the guest mapped nothing there
