"""The kernel loaders tell the boot protocol from the image's bytes and write what the published
PVH and Multiboot v1 entries promise (docs/boot-protocol.md, "Other kernels"); every malformed
image is refused with an ImageError naming what was wrong."""

from __future__ import annotations

import random
import struct

import pytest

from pyhv.worker import boot, loaders
from pyhv.worker.boot import ImageError
from pyhv.worker.loaders import multiboot, protected, pvh
from tests.guests.build import build_kernel32

pytestmark = pytest.mark.unit

MIB = 1 << 20
PVH_NOTE = struct.pack("<III", 4, 4, 18) + b"Xen\0"


class FakeMemory:
    """Guest RAM as a bytearray."""

    def __init__(self, size: int = 8 * MIB) -> None:
        self.ram = bytearray(size)

    def write(self, gpa: int, data: bytes) -> None:
        assert 0 <= gpa and gpa + len(data) <= len(self.ram)
        self.ram[gpa : gpa + len(data)] = data

    def cstring(self, gpa: int) -> bytes:
        return bytes(self.ram[gpa : self.ram.index(b"\0", gpa)])


@pytest.fixture(scope="module")
def pvh_kernel() -> bytes:
    return build_kernel32("pvh_kernel").read_bytes()


@pytest.fixture(scope="module")
def multiboot_kernel() -> bytes:
    return build_kernel32("multiboot_kernel").read_bytes()


@pytest.fixture(scope="module")
def multiboot_flat() -> bytes:
    return build_kernel32("multiboot_kernel", defines=("AOUT_KLUDGE",), flat=True).read_bytes()


def prepare(data: bytes, memory: int = 64 * MIB, cmdline: str = "") -> tuple[FakeMemory, object]:
    mem = FakeMemory()
    _image, entry = loaders.prepare(mem, data, memory=memory, vp_count=1, cmdline=cmdline)
    return mem, entry


def test_the_reference_guest_still_takes_pyhvs_direct_boot_despite_its_pvh_note() -> None:
    from pyhv.guest_image import image_path

    data = image_path().read_bytes()
    assert PVH_NOTE in data
    assert loaders.detect(data) == loaders.PYHV
    mem, entry = prepare(data, cmdline="quiet")
    assert entry == boot.EntryState(
        rip=entry.rip, gdt_limit=entry.gdt_limit
    )  # the 64-bit entry state, nothing of the 32-bit paths
    assert struct.unpack_from("<I", mem.ram, boot.BOOT_INFO_GPA)[0] == boot.BOOT_INFO_MAGIC


def test_a_pvh_elf_gets_an_hvm_start_info_and_the_32_bit_entry_of_its_note(
    pvh_kernel: bytes,
) -> None:
    assert loaders.detect(pvh_kernel) == loaders.PVH
    mem, entry = prepare(pvh_kernel, cmdline="console=ttyS0 x=1")
    magic, version, flags, nr_mod, _ml, cmd, rsdp, mmap, n, res = pvh.HVM_START_INFO.unpack_from(
        mem.ram, entry.rbx
    )
    assert (magic, version, flags, nr_mod, rsdp, res) == (0x336EC578, 1, 0, 0, 0, 0)
    assert mem.cstring(cmd) == b"console=ttyS0 x=1"
    assert [pvh.HVM_MEMMAP_ENTRY.unpack_from(mem.ram, mmap + 24 * i) for i in range(n)] == [
        (0, 64 * MIB, 1, 0)
    ]
    note_at = pvh_kernel.index(PVH_NOTE) + len(PVH_NOTE)
    assert entry.rip == struct.unpack_from("<I", pvh_kernel, note_at)[0]
    # flat 32-bit protected mode, paging off, TR a 32-bit TSS with limit 0x67
    assert (entry.cr0, entry.cr4, entry.efer) == (protected.CR0_PE | protected.CR0_ET, 0, 0)
    assert entry.cs.db == 1 and entry.cs.l == 0 and entry.cs.limit == 0xFFFFFFFF
    assert entry.tr is not None and (entry.tr.type, entry.tr.limit) == (0xB, 0x67)
    gdt = struct.unpack_from("<4Q", mem.ram, protected.GDT_GPA)
    assert gdt[entry.cs.selector >> 3] == boot.gdt_descriptor(0, 0xFFFFF, 0x9A, 0xC)


def test_an_elf64_whose_only_entry_is_its_pvh_note_boots_through_pvh() -> None:
    data = build_kernel32("pvh_kernel", elf64=True).read_bytes()
    assert data[4] == 2 and loaders.detect(data) == loaders.PVH
    _mem, entry = prepare(data)
    assert entry.cs == protected.CODE32 and entry.rbx == protected.INFO_GPA


def test_a_multiboot_elf_gets_eax_magic_and_a_multiboot_info(multiboot_kernel: bytes) -> None:
    assert loaders.detect(multiboot_kernel) == loaders.MULTIBOOT
    mem = FakeMemory()
    _image, entry = loaders.prepare(
        mem, multiboot_kernel, memory=64 * MIB, vp_count=1, cmdline="a b", path="/k/mb.elf"
    )
    assert entry.rax == 0x2BADB002
    f = multiboot.INFO.unpack_from(mem.ram, entry.rbx)
    assert f[0] == 1 | 1 << 2 | 1 << 6 | 1 << 9
    assert (f[1], f[2]) == (640, 63 * 1024)  # mem_lower, mem_upper in KiB
    assert mem.cstring(f[4]) == b"/k/mb.elf a b"  # the kernel's path first, as GRUB and QEMU
    assert mem.cstring(f[16]) == b"pyhv"
    mmap = [multiboot.MMAP_ENTRY.unpack_from(mem.ram, f[12] + o) for o in range(0, f[11], 24)]
    assert mmap == [(20, 0, 64 * MIB, 1)]


def test_memory_above_3_gib_appears_in_both_memory_maps(
    pvh_kernel: bytes, multiboot_kernel: bytes
) -> None:
    mem, entry = prepare(pvh_kernel, memory=4 << 30)
    *_, mmap, n, _res = pvh.HVM_START_INFO.unpack_from(mem.ram, entry.rbx)
    regions = [pvh.HVM_MEMMAP_ENTRY.unpack_from(mem.ram, mmap + 24 * i)[:2] for i in range(n)]
    assert regions == [(0, 3 << 30), (4 << 30, 1 << 30)]
    mem, entry = prepare(multiboot_kernel, memory=4 << 30)
    f = multiboot.INFO.unpack_from(mem.ram, entry.rbx)
    assert f[2] == ((3 << 30) - MIB) // 1024 and f[11] == 48


def test_a_multiboot_flat_image_loads_by_its_address_fields(multiboot_flat: bytes) -> None:
    assert not multiboot_flat.startswith(b"\x7fELF")
    mem, entry = prepare(multiboot_flat)
    assert mem.ram[0x100000 : 0x100000 + len(multiboot_flat)] == multiboot_flat
    hdr = multiboot.find_header(multiboot_flat)
    assert hdr is not None and hdr.flags & multiboot.FLAG_ADDRESSES
    assert entry.rip == multiboot.ADDRESSES.unpack_from(multiboot_flat, hdr.offset + 12)[4]


def aout(flags: int = 0x10000, addresses: tuple[int, ...] = (), size: int = 64) -> bytes:
    """A flat Multiboot image: header at offset 0 with the given address fields."""
    magic = multiboot.HEADER_MAGIC
    head = struct.pack("<III", magic, flags, -(magic + flags) & 0xFFFFFFFF)
    return (head + struct.pack(f"<{len(addresses)}I", *addresses)).ljust(size, b"\x90")


def elf64(code: bytes, paddr: int, entry: int) -> bytes:
    """An ELF64 x86-64 executable of one PT_LOAD segment holding `code` at `paddr`."""
    ident = b"\x7fELF\x02\x01\x01".ljust(16, b"\0")
    head = struct.pack("<16sHHIQQQIHHHHHH", ident, 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, paddr, paddr, len(code), len(code), 8)
    return head + phdr + code


REFUSED = [
    ("random bytes", lambda k: random.Random(1).randbytes(4096), "in no format pyhv boots"),
    ("an empty file", lambda k: b"", "in no format pyhv boots"),
    ("a truncated ELF", lambda k: k["pvh"][:200], "is truncated"),
    ("ELF headers only", lambda k: k["pvh"][:40], "is truncated"),
    (
        "a Multiboot header with a bad checksum",
        lambda k: k["mb"].replace(
            struct.pack("<II", 0x1BADB002, 3), struct.pack("<II", 0x1BADB002, 7)
        ),
        "with a bad checksum",
    ),
    (
        "a PVH entry outside the image",
        lambda k: k["pvh"].replace(
            PVH_NOTE + k["pvh"].split(PVH_NOTE)[1][:4], PVH_NOTE + struct.pack("<I", 0x4000000)
        ),
        "entry point 0x4000000 is outside its loaded segments",
    ),
    (
        "a Multiboot kernel asking for unknown features",
        lambda k: aout(flags=0x10010, addresses=(0x100000, 0x100000, 0, 0, 0x100020)),
        "flag bits 0x10",
    ),
    (
        "a Multiboot image loaded over the boot structures",
        lambda k: aout(addresses=(0x1000, 0x1000, 0, 0, 0x1020)),
        "overlaps the boot structures",
    ),
    (
        "a Multiboot image beyond RAM",
        lambda k: aout(addresses=(0x8000000, 0x8000000, 0, 0x9000000, 0x8000020)),
        "is outside guest RAM",
    ),
    (
        "a Multiboot image whose load range passes the file's end",
        lambda k: aout(addresses=(0x100000, 0x100000, 0x200000, 0, 0x100020)),
        "is truncated",
    ),
    (
        "a Multiboot header cut before its address fields",
        lambda k: aout(size=16),
        "ends before its address fields",
    ),
    (
        "a Multiboot load address above its header's",
        lambda k: aout(addresses=(0x100000, 0x100010, 0, 0, 0x100020)),
        "put the load start before the file's first byte",
    ),
    (
        "a Multiboot entry outside the image",
        lambda k: aout(addresses=(0x100000, 0x100000, 0, 0, 0x300000)),
        "entry point 0x300000 is outside",
    ),
    (
        "a 64-bit Multiboot ELF without address fields",
        lambda k: elf64(aout(flags=3), 0x100000, 0x100010),
        "is a 64-bit ELF with a Multiboot header",
    ),
    (
        "a 32-bit ELF with neither note nor header",
        lambda k: k["pvh"].replace(PVH_NOTE, struct.pack("<III", 4, 4, 99) + b"Xen\0"),
        "neither a PVH note",
    ),
]


@pytest.mark.parametrize("what,make,message", REFUSED, ids=[r[0] for r in REFUSED])
def test_a_malformed_or_unknown_image_is_refused_naming_what_was_wrong(
    what: str,
    make,
    message: str,
    pvh_kernel: bytes,
    multiboot_kernel: bytes,  # type: ignore[no-untyped-def]
) -> None:
    data = make({"pvh": pvh_kernel, "mb": multiboot_kernel})
    with pytest.raises(ImageError) as e:
        prepare(data)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_command_line_too_long_for_its_page_is_refused(pvh_kernel: bytes) -> None:
    with pytest.raises(ImageError, match="at most 4095"):
        prepare(pvh_kernel, cmdline="x" * 4096)
