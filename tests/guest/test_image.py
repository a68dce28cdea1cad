"""The reference guest's image: an ELF64 loaded at 1 MiB with a 64-bit entry and a Xen PVH note,
built only from instructions this machine's CPL0 emulator can run."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pyhv import guest_image
from pyhv.guest_image import GUEST_DIR, GuestBuildError, check_instructions

pytestmark = pytest.mark.unit

PT_LOAD, PT_NOTE = 1, 4
XEN_ELFNOTE_PHYS32_ENTRY = 18


def program_headers(data: bytes) -> list[tuple[int, int, int, int, int, int, int]]:
    e_phoff = struct.unpack_from("<Q", data, 32)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    out = []
    for i in range(e_phnum):
        p_type, p_flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz = struct.unpack_from(
            "<IIQQQQQ", data, e_phoff + i * e_phentsize
        )
        out.append((p_type, p_flags, p_offset, p_paddr, p_filesz, p_memsz, _vaddr))
    return out


def symbols(elf: Path) -> dict[str, int]:
    out = subprocess.run(["nm", str(elf)], capture_output=True, text=True, check=True).stdout
    return {p[2]: int(p[0], 16) for p in (line.split() for line in out.splitlines()) if len(p) == 3}


def test_the_image_is_an_elf64_executable_loaded_at_1_mib_with_phys_equal_to_virt(
    guest_image: Path,
) -> None:
    data = guest_image.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1  # ELF64, little-endian
    e_type, e_machine = struct.unpack_from("<HH", data, 16)
    e_entry = struct.unpack_from("<Q", data, 24)[0]
    assert (e_type, e_machine) == (2, 62)  # ET_EXEC, x86-64
    loads = [h for h in program_headers(data) if h[0] == PT_LOAD]
    assert loads and all(h[3] >= 0x100000 and h[3] == h[6] for h in loads)
    text = [h for h in loads if h[1] & 1]  # PF_X
    assert any(h[3] <= e_entry < h[3] + h[4] for h in text)
    assert e_entry == symbols(guest_image)["_start"]
    end = max(h[3] + h[5] for h in loads)
    assert end <= 0x200000, "the image and its .bss should stay within the first 2 MiB block"


def test_the_image_carries_a_xen_pvh_note_with_its_32_bit_entry(guest_image: Path) -> None:
    data = guest_image.read_bytes()
    notes = [h for h in program_headers(data) if h[0] == PT_NOTE]
    assert notes, "no PT_NOTE segment: PVH loaders (QEMU -M microvm -kernel) find nothing"
    found = []
    for _t, _f, off, _pa, size, _ms, _va in notes:
        pos = off
        while pos + 12 <= off + size:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz]
            desc_at = pos + 12 + (namesz + 3) // 4 * 4
            if name == b"Xen\0" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                found.append(struct.unpack_from("<I", data, desc_at)[0])
            pos = desc_at + (descsz + 3) // 4 * 4
    assert found == [symbols(guest_image)["pvh_start32"]]
    assert found[0] < 1 << 32


def test_the_image_has_no_instruction_the_cpl0_emulator_rejects(guest_image: Path) -> None:
    check_instructions(guest_image)


@pytest.mark.parametrize(
    "asm",
    [
        "popcnt %rax, %rbx",
        "movq %rax, %xmm0",
        "fld1",
        "int3",
        "int $0x80",
        "rdtscp",
        "xgetbv",
        "lock cmpxchg16b (%rdi)",
        "tzcnt %rax, %rbx",
        "crc32q %rax, %rbx",
        "vmcall",
    ],
)
def test_the_instruction_check_rejects_what_the_emulator_cannot_run(
    tmp_path: Path, asm: str
) -> None:
    src = tmp_path / "bad.S"
    src.write_text(f".text\n.globl f\nf:\n mov %rax, %rbx\n {asm}\n ret\n")
    obj = tmp_path / "bad.o"
    subprocess.run(["gcc", "-c", str(src), "-o", str(obj)], check=True)
    with pytest.raises(GuestBuildError, match="rejects"):
        check_instructions(obj)


def test_the_instruction_check_accepts_ordinary_kernel_code(tmp_path: Path) -> None:
    src = tmp_path / "ok.S"
    src.write_text(".text\nf:\n bsf %rax, %rbx\n rep stosq\n mov %fs:8, %rax\n ud2\n iretq\n")
    obj = tmp_path / "ok.o"
    subprocess.run(["gcc", "-c", str(src), "-o", str(obj)], check=True)
    check_instructions(obj)


@pytest.fixture
def guest_copy(tmp_path: Path) -> Path:
    d = tmp_path / "guest"
    shutil.copytree(GUEST_DIR, d, ignore=shutil.ignore_patterns("build"))
    return d


def test_a_changed_source_rebuilds_the_image(guest_copy: Path) -> None:
    first = guest_image.build(guest_copy)
    before = first.read_bytes()
    assert guest_image.build(guest_copy) == first and first.read_bytes() == before
    shell = guest_copy / "shell.c"
    shell.write_text(shell.read_text().replace('"pyhv> "', '"pyhv2> "'))
    assert guest_image.build(guest_copy) == first
    assert b"pyhv2> " in first.read_bytes() and first.read_bytes() != before


@pytest.mark.unit
def test_an_image_newer_than_its_sources_is_used_without_hashing_them(
    guest_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = guest_image.build(guest_copy)
    built = image.stat().st_mtime_ns
    hashed: list[Path] = []
    real_hash = guest_image.source_hash
    monkeypatch.setattr(guest_image, "source_hash", lambda d: hashed.append(d) or real_hash(d))
    assert guest_image.build(guest_copy) == image and hashed == []  # `pyhv run`'s path
    os.utime(guest_copy / "shell.c")  # touched, not changed: hashed once, not rebuilt
    assert guest_image.build(guest_copy) == image and len(hashed) == 1
    assert image.stat().st_mtime_ns == built


def test_a_read_only_source_tree_builds_into_the_cache(
    guest_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (guest_copy / "build").write_text("not a directory")  # guest/build cannot be created
    monkeypatch.setenv("PYHV_CACHE", str(tmp_path / "cache"))
    image = guest_image.build(guest_copy)
    assert image.parent == tmp_path / "cache" / f"guest-{guest_image.source_hash(guest_copy)}"
    assert image.read_bytes()[:4] == b"\x7fELF"


def test_a_missing_compiler_is_reported_with_what_to_install(
    guest_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(GuestBuildError, match=r"gcc.*not found.*apt-get install gcc"):
        guest_image.build(guest_copy)


def test_a_compile_error_is_reported_with_the_compilers_message(guest_copy: Path) -> None:
    (guest_copy / "lib.c").write_text("this is not C\n")
    with pytest.raises(GuestBuildError, match=r"(?s)building the guest image failed.*lib\.c:1"):
        guest_image.build(guest_copy)
