"""The test kernels written to published boot protocols (tests/guests/pvh_kernel.S,
multiboot_kernel.S with kernel32.c), and the lines they print, for the pyhv and QEMU tests."""

from __future__ import annotations

import re
from pathlib import Path

from tests.guests.build import build_kernel32

# name -> (build arguments, the prefix of its lines)
KERNELS = {
    "pvh": (("pvh_kernel",), {}, "pvh"),
    "pvh-elf64": (("pvh_kernel",), {"elf64": True}, "pvh"),
    "multiboot-elf": (("multiboot_kernel",), {}, "multiboot"),
    "multiboot-flat": (
        ("multiboot_kernel",),
        {"defines": ("AOUT_KLUDGE",), "flat": True},
        "multiboot",
    ),
}
CMDLINE = "console=ttyS0 greeting='hello pyhv' n=42"


def kernel(name: str) -> Path:
    args, kwargs, _ = KERNELS[name]
    return build_kernel32(*args, **kwargs)


def expected_cmdline(name: str, path: Path) -> str:
    """What the kernel receives: Multiboot loaders (GRUB, QEMU, pyhv) put the kernel's path
    first."""
    return CMDLINE if name.startswith("pvh") else f"{path} {CMDLINE}"


def shape(lines: list[str]) -> list[str]:
    """The lines with the sizes the VMMs may differ in (their memory maps) blanked."""
    return [re.sub(r"(RAM|mem_upper) \d+", r"\1 N", line) for line in lines]


def ram_mib(lines: list[str], prefix: str) -> int:
    m = next(re.fullmatch(rf"{prefix}: RAM (\d+) MiB", x) for x in lines if " RAM " in x)
    assert m is not None
    return int(m.group(1))
