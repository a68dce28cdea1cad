"""The direct boot writes the layout of docs/boot-protocol.md into guest memory."""

from __future__ import annotations

import struct

import pytest

from pyhv.worker import boot
from tests.support.elf import make_elf

pytestmark = pytest.mark.unit


class FakeMemory:
    """Guest RAM as a bytearray, recording which ranges were written."""

    def __init__(self, size: int = 8 << 20) -> None:
        self.ram = bytearray(size)
        self.writes: list[tuple[int, int]] = []

    def write(self, gpa: int, data: bytes) -> None:
        assert 0 <= gpa and gpa + len(data) <= len(self.ram)
        self.ram[gpa : gpa + len(data)] = data
        self.writes.append((gpa, len(data)))

    def u64(self, gpa: int) -> int:
        return struct.unpack_from("<Q", self.ram, gpa)[0]

    def u32(self, gpa: int) -> int:
        return struct.unpack_from("<I", self.ram, gpa)[0]


CODE = b"\xf4" * 16  # hlt


def test_the_image_is_loaded_at_its_physical_addresses_and_bss_stays_unwritten() -> None:
    mem = FakeMemory()
    elf = make_elf([(0x100000, CODE, 16, 5), (0x200000, b"data", 0x10000, 6)], entry=0x100004)
    image, state = boot.prepare(mem, elf, memory=8 << 20, vp_count=1)
    assert mem.ram[0x100000:0x100010] == CODE
    assert mem.ram[0x200000:0x200004] == b"data"
    assert (0x200000, 4) in mem.writes
    assert not any(gpa >= 0x200004 for gpa, _ in mem.writes)
    assert image.end == 0x210000
    assert state.rip == 0x100004


def test_a_file_that_is_not_elf_is_rejected_with_a_clear_error() -> None:
    with pytest.raises(boot.ImageError, match="not an ELF file"):
        boot.parse_elf(b"MZ" + bytes(100), name="guest.exe")


def test_an_image_for_another_machine_is_rejected() -> None:
    elf = make_elf([(0x100000, CODE, 16, 5)], entry=0x100000, machine=183)
    with pytest.raises(boot.ImageError, match="machine 183, not x86-64"):
        boot.parse_elf(elf)


def test_a_segment_outside_guest_ram_is_rejected() -> None:
    elf = make_elf([(0x100000, CODE, 16, 5), (0x4000000, b"x", 0x1000, 6)], entry=0x100000)
    with pytest.raises(boot.ImageError, match="outside guest RAM"):
        boot.prepare(FakeMemory(), elf, memory=32 << 20, vp_count=1)


def test_a_segment_over_the_boot_structures_is_rejected() -> None:
    elf = make_elf([(0x10000, CODE, 16, 5)], entry=0x10000)
    with pytest.raises(boot.ImageError, match="below 0x100000"):
        boot.prepare(FakeMemory(), elf, memory=8 << 20, vp_count=1)


def test_an_entry_point_outside_the_code_is_rejected() -> None:
    elf = make_elf([(0x100000, CODE, 16, 5)], entry=0x300000)
    with pytest.raises(boot.ImageError, match="entry point 0x300000"):
        boot.parse_elf(elf)


def test_a_truncated_segment_is_rejected() -> None:
    elf = make_elf([(0x100000, CODE, 16, 5)], entry=0x100000)
    with pytest.raises(boot.ImageError, match="malformed"):
        boot.parse_elf(elf[:-8])


def test_the_gdt_has_linux_selectors_for_kernel_and_user_code() -> None:
    mem = FakeMemory()
    limit = boot.build_gdt(mem)
    assert limit == 7 * 8 - 1
    assert mem.u64(0x500) == 0 and mem.u64(0x508) == 0 and mem.u64(0x520) == 0
    assert mem.u64(0x500 + 0x10) == 0x00AF9A000000FFFF  # kernel code, L=1
    assert mem.u64(0x500 + 0x18) == 0x00CF92000000FFFF  # kernel data
    assert mem.u64(0x500 + 0x28) == 0x00CFF2000000FFFF  # user data, DPL3 (selector 0x2b)
    assert mem.u64(0x500 + 0x30) == 0x00AFFA000000FFFF  # user code, DPL3 (selector 0x33)


def test_the_page_tables_identity_map_64_gib_with_2_mib_pages() -> None:
    mem = FakeMemory()
    boot.build_page_tables(mem)
    assert mem.u64(0x10000) == 0x11000 | 3
    assert mem.u64(0x10008) == 0
    for i in (0, 1, 63):
        assert mem.u64(0x11000 + 8 * i) == (0x12000 + 0x1000 * i) | 3
    assert mem.u64(0x11000 + 8 * 64) == 0
    assert mem.u64(0x12000) == 0x83
    assert mem.u64(0x12008) == (2 << 20) | 0x83
    # The last 2 MiB page of the last directory maps 64 GiB - 2 MiB, and it ends below the stack.
    last = 0x12000 + 64 * 0x1000 - 8
    assert mem.u64(last) == ((64 << 30) - (2 << 20)) | 0x83
    assert last + 8 == boot.STACK_BOTTOM


def test_the_boot_information_block_follows_the_contract() -> None:
    mem = FakeMemory()
    info = boot.BootInfo(
        vp_count=2,
        memmap=((0, 0xC000_0000, 1), (0x1_0000_0000, 0x4000_0000, 1)),
        cmdline=b"console=ttyS0 dm=1",
        flags=boot.FLAG_DYNAMIC_MEMORY,
        tsc_khz=2_400_000,
    )
    boot.write_boot_info(mem, info)
    b = 0x1000
    assert mem.u32(b + 0) == 0x56485950 and mem.ram[b : b + 4] == b"PYHV"
    assert mem.u32(b + 4) == 1
    assert mem.u32(b + 8) == 2
    assert mem.u32(b + 12) == 2
    assert mem.u64(b + 16) == 0x2000
    assert mem.u32(b + 24) == len(b"console=ttyS0 dm=1")
    assert mem.u32(b + 28) == 1
    assert mem.u64(b + 32) == 2_400_000
    assert struct.unpack_from("<QQII", mem.ram, b + 40) == (0, 0xC000_0000, 1, 0)
    assert struct.unpack_from("<QQII", mem.ram, b + 64) == (0x1_0000_0000, 0x4000_0000, 1, 0)
    assert mem.ram[0x2000 : 0x2000 + 19] == b"console=ttyS0 dm=1\0"


def test_without_a_command_line_its_address_is_zero() -> None:
    mem = FakeMemory()
    boot.write_boot_info(mem, boot.BootInfo(vp_count=1, memmap=((0, 1 << 29, 1),)))
    assert mem.u64(0x1000 + 16) == 0 and mem.u32(0x1000 + 24) == 0


def test_ram_above_3_gib_continues_at_4_gib_leaving_the_apic_hole() -> None:
    assert boot.ram_regions(512 << 20) == [(0, 512 << 20)]
    assert boot.ram_regions(4 << 30) == [(0, 3 << 30), (4 << 30, 1 << 30)]


def test_vp0_enters_long_mode_with_the_documented_registers() -> None:
    mem = FakeMemory()
    elf = make_elf([(0x100000, CODE, 16, 5)], entry=0x100000)
    _, s = boot.prepare(mem, elf, memory=8 << 20, vp_count=1, cmdline="x")
    assert s.cr0 == 0x80010033  # PE|MP|ET|NE|WP|PG
    assert s.cr4 == 0x620  # PAE|OSFXSR|OSXMMEXCPT
    assert s.efer == 0x501  # LME|LMA|SCE
    assert s.cr3 == 0x10000
    assert (s.cs.selector, s.cs.l, s.ds.selector, s.ss.selector) == (0x10, 1, 0x18, 0x18)
    assert s.fs.selector == 0 and s.gs.selector == 0
    assert (s.rflags, s.rsp, s.rsi, s.rip) == (0x2, 0x80000, 0x1000, 0x100000)
    assert (s.gdt_base, s.gdt_limit) == (0x500, 0x37)
