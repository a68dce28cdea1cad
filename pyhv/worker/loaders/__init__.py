"""Kernel loaders: tell the image's boot protocol from its bytes and load it the way QEMU's
`-kernel` would. A Multiboot v1 header in the first 8 KiB wins (QEMU checks it first); an ELF64
x86-64 executable whose entry point lies in its loaded code and is not its PVH entry takes
pyhv's direct 64-bit boot (pyhv.worker.boot); any other ELF with a Xen PVH note takes the PVH
entry. Anything else is refused with an ImageError that names what was wrong."""

from __future__ import annotations

from pyhv.worker import boot
from pyhv.worker.boot import EntryState, GuestMemory, Image, ImageError
from pyhv.worker.loaders import elf, multiboot, pvh

PYHV, PVH, MULTIBOOT = "pyhv direct boot", "PVH", "Multiboot"


def detect(data: bytes, *, name: str = "image") -> str:
    """Which protocol boots `data`: PYHV, PVH or MULTIBOOT (ImageError if none)."""
    if multiboot.find_header(data, name=name) is not None:
        return MULTIBOOT
    if not elf.is_elf(data):
        raise ImageError(
            f"{name} is in no format pyhv boots: it is not an ELF file (no \\x7fELF magic) and "
            "has no Multiboot header in its first 8 KiB; give a pyhv guest ELF, a PVH ELF "
            "(XEN_ELFNOTE_PHYS32_ENTRY note) or a Multiboot v1 kernel"
        )
    image = elf.parse(data, name=name)
    pvh_entry = pvh.entry_point(image, name=name)
    if pvh_entry is None and image.elf_class == elf.ELFCLASS64:
        return PYHV  # boot.parse_elf says what it lacks if it is no pyhv image either
    if pvh_entry is not None and pvh_entry != image.entry and _direct_boot(image):
        return PYHV  # a 64-bit entry of its own beside the PVH one: pyhv's image
    if pvh_entry is None:
        raise ImageError(
            f"{name} is a 32-bit ELF with neither a PVH note (XEN_ELFNOTE_PHYS32_ENTRY) nor a "
            "Multiboot header in its first 8 KiB: pyhv cannot tell how to enter it"
        )
    return PVH


def _direct_boot(image: elf.ElfFile) -> bool:
    """pyhv's own image: a 64-bit x86-64 executable entered in its loaded code."""
    seg = image.loaded(image.entry)
    return (
        image.elf_class == elf.ELFCLASS64
        and image.machine == elf.EM_X86_64
        and image.type == boot.ET_EXEC
        and seg is not None
        and seg.executable
    )


def prepare(
    mem: GuestMemory,
    data: bytes,
    *,
    memory: int,
    vp_count: int,
    cmdline: str = "",
    flags: int = 0,
    tsc_khz: int = 0,
    name: str = "image",
    path: str | None = None,
) -> tuple[Image, EntryState]:
    """Load `data` by its protocol; returns the image and VP 0's entry state. `path` is the
    kernel's path as the user gave it (Multiboot passes it at the head of the command line)."""
    kind = detect(data, name=name)
    if kind == PYHV:
        return boot.prepare(
            mem,
            data,
            memory=memory,
            vp_count=vp_count,
            cmdline=cmdline,
            flags=flags,
            tsc_khz=tsc_khz,
            name=name,
        )
    ram = boot.ram_regions(memory)
    if kind == MULTIBOOT:
        header = multiboot.find_header(data, name=name)
        assert header is not None
        return multiboot.prepare(
            mem, data, header, ram=ram, cmdline=cmdline, path=path or name, name=name
        )
    return pvh.prepare(mem, elf.parse(data, name=name), ram=ram, cmdline=cmdline, name=name)
