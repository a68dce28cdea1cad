"""Build the small test guests (tests/guests/*.S) into flat binaries, cached by source hash.

A guest is assembled with gcc and linked with ld at `base` (its load GPA); symbols come from nm.
The cache is build/test-guests/ in the repository (or $PYHV_TEST_GUEST_DIR).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

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


def build_guest(name: str, base: int = LOAD_GPA, source: str | None = None) -> GuestImage:
    """Assemble tests/guests/<name>.S (or `source` text) into a flat image loaded at `base`."""
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
