"""The image also boots the way Xen PVH loaders (QEMU -M microvm -kernel) start it: at the 32-bit
entry of its XEN_ELFNOTE_PHYS32_ENTRY note, in protected mode without paging, with EBX pointing
at an hvm_start_info. The guest builds its own page tables and boot-information block from it."""

from __future__ import annotations

import struct
import threading
from pathlib import Path
from typing import Any

import pytest

from pyhv.devices.uart16550 import COM1_BASE, Uart16550
from pyhv.worker import boot

pytestmark = pytest.mark.guest

HVM_START_MAGIC = 0x336EC578
START_INFO = struct.Struct("<IIIIQQQQII")  # Xen's hvm_start_info, version 1
START_INFO_GPA, MEMMAP_GPA, CMDLINE_GPA = 0x6000, 0x6100, 0x6200
MIB = 1 << 20


def pvh_entry(data: bytes) -> int:
    phoff = struct.unpack_from("<Q", data, 32)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _fl, off, _va, _pa, _fs, _ms, _al = boot.ELF_PHDR.unpack_from(
            data, phoff + i * phentsize
        )
        if p_type == 4:  # PT_NOTE: the first note is the PVH entry
            namesz, _descsz, ntype = struct.unpack_from("<III", data, off)
            assert ntype == 18
            return int(struct.unpack_from("<I", data, off + 12 + (namesz + 3) // 4 * 4)[0])
    raise AssertionError("no PT_NOTE")


def pvh_boot(image: Path, magic: int = HVM_START_MAGIC, memmap_entries: int | None = None) -> str:
    """Start the image at its PVH entry in 96 MiB; the console output up to the prompt or a halt."""
    from pyhv.hypervisor import Partition
    from pyhv.hypervisor.registers import Registers, Segment

    data = image.read_bytes()
    out = bytearray()
    done = threading.Event()

    def output(b: bytes) -> None:
        out.extend(b)
        if out.endswith(b"pyhv> ") or out.endswith(b"halted: no usable boot information\r\n"):
            done.set()

    uart = Uart16550(output)

    def com1(msg: Any) -> int | None:
        if msg.is_write:
            uart.io_write(msg.port - COM1_BASE, msg.access_size, msg.value)
            return None
        return uart.io_read(msg.port - COM1_BASE, msg.access_size)

    with Partition(name="pvh") as p:
        p.add_memory(0, 96 * MIB)
        boot.load_image(p, boot.parse_elf(data))
        memmap = [(0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0x100000, 95 * MIB, 1)]
        n = len(memmap) if memmap_entries is None else memmap_entries
        p.write(MEMMAP_GPA, b"".join(struct.pack("<QQII", b, s, t, 0) for b, s, t in memmap))
        p.write(CMDLINE_GPA, b"console=ttyS0\0")
        p.write(
            START_INFO_GPA, START_INFO.pack(magic, 1, 0, 0, 0, CMDLINE_GPA, 0, MEMMAP_GPA, n, 0)
        )
        p.intercepts.install_io(COM1_BASE, COM1_BASE + 7, com1)
        vp = p.create_vp(0)
        sregs = vp.special_registers
        sregs.cs = Segment(limit=0xFFFFFFFF, selector=0x10, type=11, db=1, g=1)
        for name in ("ds", "es", "ss", "fs", "gs"):
            setattr(sregs, name, Segment(limit=0xFFFFFFFF, selector=0x18, type=3, db=1, g=1))
        sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x11, 0, 0, 0  # PE|ET: no paging
        vp.special_registers = sregs
        vp.registers = Registers(rip=pvh_entry(data), rbx=START_INFO_GPA, rflags=2)
        vp.start()
        try:
            assert done.wait(30), f"the guest neither booted nor halted; output: {bytes(out)!r}"
        finally:
            vp.stop()
    return out.decode().replace("\r", "")


def test_a_pvh_loader_boots_the_image_at_its_32_bit_entry(guest_image: Path) -> None:
    out = pvh_boot(guest_image)
    # the RAM of the PVH memory map, in MiB, rounded down: 0x9fc00 bytes + 95 MiB
    assert out.startswith("pyhv guest: 95 MiB RAM") and out.endswith("pyhv> ")


def test_a_start_info_without_the_pvh_magic_is_refused(guest_image: Path) -> None:
    out = pvh_boot(guest_image, magic=0x12345678)
    assert "boot: bad boot-info magic 0" in out and out.endswith(
        "halted: no usable boot information\n"
    )


def test_a_start_info_with_an_empty_memory_map_is_refused(guest_image: Path) -> None:
    out = pvh_boot(guest_image, memmap_entries=0)
    assert "boot: nr_memmap 0 out of range 1..64" in out


def test_a_start_info_claiming_too_many_memory_map_entries_is_read_only_up_to_64(
    guest_image: Path,
) -> None:
    out = pvh_boot(guest_image, memmap_entries=100_000)  # the rest of the 64 are zero: no RAM
    assert out.startswith("pyhv guest: 95 MiB RAM")
