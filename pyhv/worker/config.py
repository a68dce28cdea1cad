"""The validated configuration a worker builds a VM from (Firecracker's vmm_config)."""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

from pyhv import sizes
from pyhv.sizes import GIB, MIB, format_size

# The identity map at boot covers 64 GiB; the 3-4 GiB hole holds the IOAPIC and LAPIC.
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 60 * GIB
MAX_VPS = 64
MAX_CMDLINE = 4095
#: The page file's disk (the synthetic storage channel): whole MiB, at most this much.
MAX_PAGE_FILE = 16 * GIB
_page_files = itertools.count()


class ConfigError(ValueError):
    """A VM configuration value is invalid; the message says which value and what to use."""


def parse_size(text: str | int) -> int:
    """pyhv.sizes.parse_size, its error as a ConfigError (a bad size is a bad configuration)."""
    try:
        return sizes.parse_size(text)
    except sizes.SizeError as e:
        raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class VmConfig:
    """What a VM is made of. Build with :meth:`create` to get values checked."""

    name: str
    memory: int
    vps: int
    image: Path
    cmdline: str = ""
    dynamic_memory: bool = False
    #: Dynamic Memory range (bytes); both equal `memory` (the startup RAM) without it.
    minimum: int = 0
    maximum: int = 0
    #: The synthetic storage disk the guest pages to (bytes; 0: none) and its host file (empty:
    #: the worker picks one and removes it at the end: see :meth:`page_file_path`).
    page_file_size: int = 0
    page_file: str = ""
    #: Guest RAM in 2 MiB pages (a private tmpfs, pyhv.memory.hugeram): discarding freed memory
    #: (free-page hints, balloons) is ~30 times cheaper. Needs CAP_SYS_ADMIN (no jail).
    huge_pages: bool = False

    @property
    def startup(self) -> int:
        """Startup RAM: what the guest boots with (Dynamic Memory's "Startup RAM")."""
        return self.memory

    @classmethod
    def create(
        cls,
        *,
        image: str | Path,
        memory: str | int = "512M",
        vps: int = 1,
        cmdline: str = "",
        name: str = "vm",
        dynamic_memory: bool = False,
        check_image: bool = True,
        startup: str | int | None = None,
        minimum: str | int | None = None,
        maximum: str | int | None = None,
        page_file_size: str | int = 0,
        page_file: str | Path = "",
        huge_pages: bool = False,
    ) -> VmConfig:
        if startup is not None:
            memory = startup  # Dynamic Memory's name for the RAM the guest boots with
        size = parse_size(memory)
        if size % MIB:
            raise ConfigError(
                f"memory size {format_size(size)} is not a whole number of MiB: round it to M"
            )
        if not MIN_MEMORY <= size <= MAX_MEMORY:
            raise ConfigError(
                f"memory size {format_size(size)} is out of range: use {format_size(MIN_MEMORY)} "
                f"to {format_size(MAX_MEMORY)}"
            )
        if not isinstance(huge_pages, bool):
            raise ConfigError(f"huge_pages {huge_pages!r} must be true or false")
        if not isinstance(vps, int) or not 1 <= vps <= MAX_VPS:
            raise ConfigError(f"VP count {vps!r} is out of range: use 1 to {MAX_VPS}")
        try:
            raw = cmdline.encode("utf-8")
        except UnicodeEncodeError:  # JSON text may hold a lone surrogate ("\ud800")
            raise ConfigError(
                f"command line {cmdline[:60]!r} is not Unicode text (it holds a lone surrogate): "
                "send UTF-8 text"
            ) from None
        if len(raw) > MAX_CMDLINE or b"\0" in raw:
            raise ConfigError(
                f"command line of {len(raw)} bytes is not usable: at most {MAX_CMDLINE} bytes, no NUL"
            )
        path = Path(image)
        try:
            missing = check_image and not path.is_file()
        except OSError as e:  # a name too long (ENAMETOOLONG), a directory we may not read
            raise ConfigError(
                f"guest image {str(path)[:200]!r} cannot be read: {e.strerror}"
            ) from None
        if missing:
            raise ConfigError(
                f"guest image {str(path)!r} does not exist: build it with `make guest`"
            )
        if not name or len(name) > 64:
            raise ConfigError(f"VM name {name!r} must be 1 to 64 characters")
        low, high = _dynamic_range(size, dynamic_memory, minimum, maximum)
        disk = _page_file_size(page_file_size, dynamic_memory)
        if page_file and not disk:
            raise ConfigError(
                f"page file {str(page_file)!r} without a size: give page_file_size too"
            )
        return cls(
            name=name,
            memory=size,
            vps=vps,
            image=path,
            cmdline=cmdline,
            dynamic_memory=dynamic_memory,
            minimum=low,
            maximum=high,
            page_file_size=disk,
            page_file=str(page_file),
            huge_pages=huge_pages,
        )

    def page_file_path(self, directory: str | Path) -> Path:
        """The page file's host file: as configured, else ``<directory>/<name>-<pid>.pagefile``
        (a file of this worker's own, removed when the VM closes)."""
        if self.page_file:
            return Path(self.page_file)
        return Path(directory) / f"{self.name}-{os.getpid()}-{next(_page_files)}.pagefile"

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "memory": self.memory,
            "vps": self.vps,
            "image": str(self.image),
            "cmdline": self.cmdline,
            "dynamic_memory": self.dynamic_memory,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "page_file_size": self.page_file_size,
            "page_file": self.page_file,
            "huge_pages": self.huge_pages,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> VmConfig:
        """Re-validate a configuration received from another process."""
        return cls.create(
            image=str(d["image"]),
            memory=int(d["memory"]),  # type: ignore[call-overload]
            vps=int(d["vps"]),  # type: ignore[call-overload]
            cmdline=str(d.get("cmdline", "")),
            name=str(d.get("name", "vm")),
            dynamic_memory=bool(d.get("dynamic_memory", False)),
            minimum=d.get("minimum") or None,  # type: ignore[arg-type]
            maximum=d.get("maximum") or None,  # type: ignore[arg-type]
            page_file_size=int(d.get("page_file_size", 0)),  # type: ignore[call-overload]
            page_file=str(d.get("page_file", "")),
            huge_pages=d.get("huge_pages", False),  # type: ignore[arg-type]
        )


def _dynamic_range(
    startup: int, dynamic: bool, minimum: str | int | None, maximum: str | int | None
) -> tuple[int, int]:
    """Minimum and maximum RAM of Dynamic Memory, checked: minimum <= startup <= maximum, whole
    MiB. Without Dynamic Memory both are the startup RAM (and may not be given otherwise)."""
    if not dynamic:
        for what, v in (("minimum", minimum), ("maximum", maximum)):
            if v is not None and parse_size(v) != startup:
                raise ConfigError(
                    f"{what} memory {format_size(parse_size(v))} needs Dynamic Memory: "
                    "turn it on (--dynamic-memory) or leave the value out"
                )
        return startup, startup
    low = startup if minimum is None else parse_size(minimum)
    high = startup if maximum is None else parse_size(maximum)
    for what, v in (("minimum", low), ("maximum", high)):
        if isinstance(v, bool) or v % MIB:
            raise ConfigError(
                f"{what} memory {format_size(v)} is not a whole number of MiB: round it to M"
            )
    if not MIN_MEMORY <= low <= startup:
        raise ConfigError(
            f"minimum memory {format_size(low)} must be from {format_size(MIN_MEMORY)} up to "
            f"the startup memory {format_size(startup)}"
        )
    if not startup <= high <= MAX_MEMORY:
        raise ConfigError(
            f"maximum memory {format_size(high)} must be from the startup memory "
            f"{format_size(startup)} up to {format_size(MAX_MEMORY)}"
        )
    return low, high


def _page_file_size(size: str | int, dynamic: bool) -> int:
    """The page file's disk size, checked: whole MiB up to MAX_PAGE_FILE; it needs VMBus, which
    comes with Dynamic Memory."""
    n = parse_size(size) if size else 0
    if not n:
        return 0
    if n % MIB or n > MAX_PAGE_FILE:
        raise ConfigError(
            f"page file size {format_size(n)} must be a whole number of MiB up to "
            f"{format_size(MAX_PAGE_FILE)}"
        )
    if not dynamic:
        raise ConfigError(
            "a page file is a disk on VMBus, which comes with Dynamic Memory: turn it on "
            "(--dynamic-memory) or leave page_file_size out"
        )
    return n
