"""The one build path for every test guest (tests/guests/*.S, kernel32.c), cached by source hash.

Three shapes, one per way a test loads a guest:
- `build_guest`: a flat image linked at `base` (its load GPA), loaded straight into a partition
  by tests/guests/harness.py; symbols come from nm;
- `build_test_guest`: an ELF linked at 1 MiB by link.ld, booted by the worker like the reference
  guest (docs/boot-protocol.md);
- `build_kernel32`: a 32-bit kernel that follows a published boot protocol (PVH, Multiboot).
The cache is build/test-guests/ in the repository (or $PYHV_TEST_GUEST_DIR).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("PYHV_TEST_GUEST_DIR", HERE.parent.parent / "build" / "test-guests"))
LOAD_GPA = 0x200000


@dataclass(frozen=True)
class GuestImage:
    name: str
    code: bytes
    base: int
    symbols: dict[str, int]

    @property
    def entry(self) -> int:
        return self.symbols.get("_start", self.base)

    def __getitem__(self, symbol: str) -> int:
        return self.symbols[symbol]


def _need(tool: str, package: str) -> str:
    """The tool's path; a test fails saying what to install when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed: pyhv needs it to build the test guests "
            f"(apt-get install {package})"
        )
    return path


def build_guest(name: str, base: int = LOAD_GPA, source: str | None = None) -> GuestImage:
    """Assemble tests/guests/<name>.S (or `source` text) into a flat image loaded at `base`."""
    _need("gcc", "gcc")
    text = source if source is not None else (HERE / f"{name}.S").read_text()
    h = hashlib.sha256(f"{base:#x}\n{text}".encode())
    for inc in sorted(HERE.glob("*.h")):  # shared macros the guests include
        h.update(inc.read_bytes())
    tag = h.hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{name}-{tag}.bin"
    elf = out.with_suffix(".elf")
    if not (out.exists() and elf.exists()):
        # per-process intermediate files: test processes may build the same guest at once
        src = CACHE / f"{name}-{tag}.{os.getpid()}.S"
        src.write_text(text)
        obj = src.with_suffix(".o")
        lds = CACHE / f"flat-{base:x}.{os.getpid()}.ld"
        lds.write_text(
            f"ENTRY(_start)\nSECTIONS {{\n . = {base:#x};\n .text : {{ *(.text*) }}\n"
            " .data : { *(.data*) *(.rodata*) }\n .bss : { *(.bss*) *(COMMON) }\n"
            " /DISCARD/ : { *(.note*) *(.comment) *(.eh_frame*) }\n}\n"
        )
        subprocess.run(
            ["gcc", "-c", "-x", "assembler-with-cpp", "-I", str(HERE), str(src), "-o", str(obj)],
            check=True,
        )
        tmp_elf = elf.with_suffix(f".{os.getpid()}.elf.tmp")
        subprocess.run(
            [
                "ld",
                "-nostdlib",
                "-static",
                "-z",
                "noexecstack",
                "-T",
                str(lds),
                "-o",
                str(tmp_elf),
                str(obj),
            ],
            check=True,
        )
        tmp_bin = out.with_suffix(f".{os.getpid()}.bin.tmp")
        subprocess.run(
            [
                "objcopy",
                "-O",
                "binary",
                "--set-section-flags",
                ".bss=alloc,load,contents",
                str(tmp_elf),
                str(tmp_bin),
            ],
            check=True,
        )
        os.replace(tmp_elf, elf)
        os.replace(tmp_bin, out)
        src.unlink()
        obj.unlink()
        lds.unlink()
    symbols = {}
    nm = subprocess.run(["nm", str(elf)], check=True, capture_output=True, text=True).stdout
    for line in nm.splitlines():
        parts = line.split()
        if len(parts) == 3:
            symbols[parts[2]] = int(parts[0], 16)
    return GuestImage(name, out.read_bytes(), base, symbols)


def build_test_guest(name: str, out: Path) -> Path:
    """Assemble tests/guests/<name>.S into `out/name.elf`, linked at 1 MiB like the real guest."""
    gcc = _need("gcc", "gcc")
    elf = out / f"{name}.elf"
    if not elf.exists():
        subprocess.run(
            [
                gcc,
                "-nostdlib",
                "-static",
                "-no-pie",
                f"-Wl,-T,{HERE / 'link.ld'}",
                "-Wl,--build-id=none",
                "-Wl,-z,noexecstack",
                "-o",
                str(elf),
                str(HERE / f"{name}.S"),
            ],
            check=True,
        )
    return elf


KERNEL_BASE = 0x100000
KERNEL32_CFLAGS = (
    "-m32 -march=i686 -O2 -ffreestanding -fno-pic -fno-pie -fno-stack-protector "
    "-mgeneral-regs-only -fno-asynchronous-unwind-tables -fno-builtin -nostdlib -Wall -Werror"
).split()
KERNEL32_LDS = f"""OUTPUT_FORMAT(elf32-i386)
ENTRY(_start)
PHDRS {{ text PT_LOAD FLAGS(7); note PT_NOTE FLAGS(4); }}
SECTIONS {{
 . = {KERNEL_BASE:#x};
 _load_start = .;
 .text : {{ *(.multiboot) *(.text*) }} :text
 .note.Xen : {{ *(.note.Xen) }} :text :note
 .rodata : {{ *(.rodata*) }} :text
 .data : {{ *(.data*) }} :text
 _edata = .;
 .bss : {{ *(.bss*) *(COMMON) }} :text
 _end = .;
 /DISCARD/ : {{ *(.comment) *(.eh_frame*) *(.note.GNU-stack) *(.note.gnu*) }}
}}
"""


def build_kernel32(
    name: str, *, defines: tuple[str, ...] = (), flat: bool = False, elf64: bool = False
) -> Path:
    """Build tests/guests/<name>.S with kernel32.c into a 32-bit ELF kernel linked at 1 MiB (or,
    with `flat`, its flat image from the first loaded byte; with `elf64`, the same 32-bit code in
    an ELF64 file, as 64-bit kernels carry their PVH entry); returns the cached file's path.
    These kernels follow published boot protocols (PVH, Multiboot), not pyhv's own."""
    _need("gcc", "gcc")
    sources = [HERE / f"{name}.S", HERE / "kernel32.c"]
    h = hashlib.sha256(f"{KERNEL32_CFLAGS}\n{defines}\n{flat}\n{elf64}\n{KERNEL32_LDS}".encode())
    for src in [*sources, *sorted(HERE.glob("*.h"))]:  # with the macros they include
        h.update(src.read_bytes())
    tag = h.hexdigest()[:16]
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"{name}-{tag}{'.bin' if flat else '.elf'}"
    if out.exists():
        return out
    work = CACHE / f"{name}-{tag}.{os.getpid()}"  # per process: tests may build at once
    work.mkdir(exist_ok=True)
    objs = []
    for src in sources:
        obj = work / f"{src.stem}.o"
        cmd = [
            "gcc",
            *KERNEL32_CFLAGS,
            *(f"-D{d}" for d in defines),
            "-c",
            str(src),
            "-o",
            str(obj),
        ]
        subprocess.run(cmd, check=True)
        objs.append(str(obj))
    lds = work / "kernel32.ld"
    lds.write_text(KERNEL32_LDS)
    elf = work / "kernel.elf"
    subprocess.run(
        ["ld", "-m", "elf_i386", "-nostdlib", "-static", "-z", "noexecstack",
         "-z", "max-page-size=0x1000", "--no-warn-rwx-segments", "-T", str(lds), "-o", str(elf), *objs],
        check=True,
    )  # fmt: skip
    result = elf
    if elf64:
        result = work / "kernel64.elf"
        subprocess.run(["objcopy", "-O", "elf64-x86-64", str(elf), str(result)], check=True)
    if flat:
        result = work / "kernel.bin"
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", "-j", ".rodata",
                        "-j", ".data", str(elf), str(result)], check=True)  # fmt: skip
    os.replace(result, out)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return out
