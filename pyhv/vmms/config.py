"""A VM's stored configuration as the VMMS keeps it (Hyper-V's VM settings, Set-VMMemory):
VP count, startup memory, Dynamic Memory on/off with minimum, maximum, buffer and weight,
guest image and command line. Values are checked when a configuration is built, and a change
to a running VM follows the book's rules: startup memory is fixed, minimum may only go down,
maximum only up. The memory rules themselves are `pyhv.dynmem.balancer.MemorySettings`'s.

What a caller may give is declared once, as msgspec Structs (:class:`Settings`,
:class:`SettingsChange`; docs/messages.md): each field's type, bounds and meaning, from which
the API's validation and its OpenAPI schema come too. The rules across fields are checked
here after the types."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from pyhv.dynmem.balancer import (
    DEFAULT_BUFFER_PERCENT,
    DEFAULT_WEIGHT,
    PAGE_SIZE,
    MemorySettings,
    SettingsError,
)
from pyhv.vmms.images import ImageError, check_image_name
from pyhv.worker.config import (
    MAX_MEMORY,
    MIB,
    MIN_MEMORY,
    ConfigError,
    VmConfig,
    format_size,
    parse_size,
)

#: A name is also a file name in the state directory and a path segment of the API.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

#: Settings a caller may give, with what each means (also the OpenAPI schema's descriptions).
FIELDS: dict[str, str] = {
    "name": "1-64 characters: letters, digits, '.', '_', '-' (not first)",
    "vps": "virtual processors, 1..64",
    "memory": "startup memory: bytes or a size such as 512M (16M..60G, whole MiB)",
    "dynamic_memory": "Dynamic Memory on (true) or off (false)",
    "minimum": "Dynamic Memory minimum (default: startup / 2, at least 16M)",
    "maximum": "Dynamic Memory maximum (default: 4 x startup, at most 60G)",
    "buffer": "Dynamic Memory buffer in percent, 5..2000 (default 20)",
    "weight": "memory weight (priority) 0..100 (default 50)",
    "image": "guest image: a file name in the VMMS's images directory, or 'pyhv-guest' (the "
    "bundled reference guest, the default); never a host path",
    "cmdline": "guest kernel command line",
    "page_file_size": "the page file's disk on VMBus (synthetic storage) the guest pages to: "
    "bytes or a size such as 256M (whole MiB, at most 16G; 0: none; needs Dynamic Memory)",
    "dirty_ring_entries": "entries of each VP's dirty ring, a power of two 256..65536 (e.g. "
    "4096): dirty pages logged per VP, which a migration's dirty_limit needs; 0: KVM's bitmap",
    "huge_pages": "guest RAM in 2 MiB pages on a private tmpfs (true): memory the guest frees "
    "leaves the host ~30 times faster; the host backs RAM in 2 MiB steps (default false)",
}

#: What may change while the VM runs (Hyper-V: the Dynamic Memory knobs, within the rules).
RUNNING_CHANGES = ("minimum", "maximum", "buffer", "weight")

Name = Annotated[str, Meta(pattern=NAME_RE.pattern, description=FIELDS["name"])]
Vps = Annotated[int, Meta(ge=1, le=64, description=FIELDS["vps"])]
Buffer = Annotated[int, Meta(ge=5, le=2000, description=FIELDS["buffer"])]
Weight = Annotated[int, Meta(ge=0, le=100, description=FIELDS["weight"])]
DynamicMemory = Annotated[bool, Meta(description=FIELDS["dynamic_memory"])]
Image = Annotated[str, Meta(min_length=1, description=FIELDS["image"])]
Cmdline = Annotated[str, Meta(max_length=4096, description=FIELDS["cmdline"])]
#: Sizes: bytes or text such as "512M" (parse_size reads it; the range is checked after).
Memory = Annotated[int | str, Meta(description=FIELDS["memory"], examples=["512M"])]
Minimum = Annotated[int | str, Meta(description=FIELDS["minimum"], examples=["256M"])]
Maximum = Annotated[int | str, Meta(description=FIELDS["maximum"], examples=["2G"])]
PageFileSize = Annotated[int | str, Meta(description=FIELDS["page_file_size"], examples=["256M"])]
DirtyRing = Annotated[int, Meta(ge=0, le=65536, description=FIELDS["dirty_ring_entries"])]
HugePages = Annotated[bool, Meta(description=FIELDS["huge_pages"])]


class SettingsChange(Struct, forbid_unknown_fields=True, omit_defaults=True):
    """A running VM may change only minimum (down), maximum (up), buffer and weight; an off VM
    anything but its name."""

    vps: Vps | UnsetType = UNSET
    memory: Memory | UnsetType = UNSET
    dynamic_memory: DynamicMemory | UnsetType = UNSET
    minimum: Minimum | UnsetType = UNSET
    maximum: Maximum | UnsetType = UNSET
    buffer: Buffer | UnsetType = UNSET
    weight: Weight | UnsetType = UNSET
    image: Image | None | UnsetType = UNSET
    cmdline: Cmdline | UnsetType = UNSET
    page_file_size: PageFileSize | UnsetType = UNSET
    dirty_ring_entries: DirtyRing | UnsetType = UNSET
    huge_pages: HugePages | UnsetType = UNSET


class Settings(SettingsChange, kw_only=True):
    """A new VM's settings; unset ones take their defaults."""

    name: Name


def describe_error(e: msgspec.ValidationError) -> str:
    """msgspec's message (what was expected, at which field), and what the setting may be."""
    why = str(e)
    field = why.rpartition("- at `$.")[2].rstrip("`").rpartition(".")[2]
    return why + (f" ({field}: {FIELDS[field]})" if field in FIELDS else "")


class VmSettingsError(ValueError):
    """A configuration value is wrong; the message names it, gives the value and the fix."""


@dataclass(frozen=True)
class VmSettings:
    """One VM's configuration. Build with :func:`settings_from_dict` to have it checked."""

    name: str
    vps: int = 1
    memory: int = 512 * MIB
    dynamic_memory: bool = False
    minimum: int = 256 * MIB
    maximum: int = 2048 * MIB
    buffer: int = DEFAULT_BUFFER_PERCENT
    weight: int = DEFAULT_WEIGHT
    image: str | None = None
    cmdline: str = ""
    page_file_size: int = 0
    dirty_ring_entries: int = 0
    huge_pages: bool = False

    def memory_settings(self) -> MemorySettings:
        """The balancer's view (pages); raises SettingsError for values it refuses."""
        return MemorySettings(
            self.memory // PAGE_SIZE,
            self.minimum // PAGE_SIZE,
            self.maximum // PAGE_SIZE,
            self.buffer,
            self.weight,
        )

    def worker_config(self, image: str, page_file: str = "") -> VmConfig:
        """What the worker boots (the worker checks it again on its side); `page_file`: the
        page file's host file, when the VM has one."""
        # The worker clamps memory targets to minimum and maximum itself.
        dynamic = self.dynamic_memory
        return VmConfig.create(
            image=image,
            memory=self.memory,
            vps=self.vps,
            cmdline=self.cmdline,
            name=self.name,
            dynamic_memory=dynamic,
            minimum=self.minimum if dynamic else None,
            maximum=self.maximum if dynamic else None,
            page_file_size=self.page_file_size,
            page_file=page_file if self.page_file_size else "",
            dirty_ring_entries=self.dirty_ring_entries,
            huge_pages=self.huge_pages,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _size(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise VmSettingsError(
            f"{key} must be a size in bytes or a string such as '512M', got {value!r}"
        )
    try:
        size = parse_size(value)
    except ConfigError as e:
        raise VmSettingsError(str(e) if key == "memory" else f"{key}: {e}") from None
    if size % MIB:
        raise VmSettingsError(f"{key} {format_size(size)} is not a whole number of MiB: round it")
    if not MIN_MEMORY <= size <= MAX_MEMORY:
        raise VmSettingsError(
            f"{key} {format_size(size)} is out of range: use {format_size(MIN_MEMORY)} to "
            f"{format_size(MAX_MEMORY)}"
        )
    return size


def check_name(name: object) -> str:
    """The name, or VmSettingsError saying what a name may be."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise VmSettingsError(
            f"VM name {name!r} is not usable: {FIELDS['name']} (it names a file and a URL)"
        )
    return name


def _fields(raw: Mapping[str, object], allowed: tuple[str, ...]) -> dict[str, Any]:
    """The given fields, decoded against their declaration (SettingsChange, and the name);
    unknown keys are refused, not ignored. Sizes become bytes."""
    if not isinstance(raw, Mapping):
        raise VmSettingsError(f"settings must be an object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise VmSettingsError(
            f"unknown setting(s) {', '.join(map(repr, unknown))}: known are {', '.join(allowed)}"
        )
    given = {k: v for k, v in raw.items() if k != "name"}
    try:
        out: dict[str, Any] = msgspec.to_builtins(msgspec.convert(given, SettingsChange))
    except msgspec.ValidationError as e:
        raise VmSettingsError(describe_error(e)) from None
    if "name" in raw:
        out["name"] = check_name(raw["name"])
    for key in ("memory", "minimum", "maximum"):
        if key in out:
            out[key] = _size(key, out[key])
    if "page_file_size" in out:
        v = out["page_file_size"]
        try:
            out["page_file_size"] = 0 if v in (0, "0") else parse_size(v)
        except ConfigError as e:
            raise VmSettingsError(f"page_file_size: {e}") from None
    return out


def _validated(s: VmSettings) -> VmSettings:
    if s.image is not None:
        try:
            check_image_name(s.image)
        except ImageError as e:
            raise VmSettingsError(str(e)) from None
    try:
        # The worker's own checks (VP count, command line), image checked when it starts.
        VmConfig.create(
            image=s.image or "-",
            memory=s.memory,
            vps=s.vps,
            cmdline=s.cmdline,
            name=s.name,
            check_image=False,
            dynamic_memory=s.dynamic_memory,
            minimum=s.minimum if s.dynamic_memory else None,
            maximum=s.maximum if s.dynamic_memory else None,
            page_file_size=s.page_file_size,
            dirty_ring_entries=s.dirty_ring_entries,
        )
    except ConfigError as e:
        raise VmSettingsError(str(e)) from None
    try:
        s.memory_settings()
    except SettingsError as e:
        raise VmSettingsError(
            f"dynamic memory settings minimum={format_size(s.minimum)} "
            f"startup={format_size(s.memory)} maximum={format_size(s.maximum)} "
            f"buffer={s.buffer} weight={s.weight} are refused: {e}"
        ) from None
    return s


def settings_from_dict(raw: Mapping[str, object]) -> VmSettings:
    """A new VM's settings from a request body or a stored file. Unset minimum and maximum
    default to startup / 2 (at least 16M) and 4 x startup (at most 60G)."""
    values = _fields(raw, tuple(FIELDS))
    if "name" not in values:
        raise VmSettingsError("name is required: give the VM a name")
    memory = values.setdefault("memory", 512 * MIB)
    values.setdefault("minimum", max(MIN_MEMORY, memory // 2 // MIB * MIB))
    values.setdefault("maximum", min(MAX_MEMORY, memory * 4))
    return _validated(VmSettings(**values))


def apply_changes(current: VmSettings, raw: Mapping[str, object], running: bool) -> VmSettings:
    """`current` with the changes in `raw`. A VM that is off may change anything but its name;
    a running VM only its Dynamic Memory minimum (down), maximum (up), buffer and weight."""
    allowed = RUNNING_CHANGES if running else tuple(k for k in FIELDS if k != "name")
    try:
        values = _fields(raw, allowed)
    except VmSettingsError as e:
        if running and isinstance(raw, Mapping) and set(raw) - set(RUNNING_CHANGES):
            fixed = sorted(set(raw) - set(RUNNING_CHANGES))
            raise VmSettingsError(
                f"{', '.join(fixed)} cannot change while VM {current.name!r} runs: only "
                f"{', '.join(RUNNING_CHANGES)} can; stop the VM first"
                + (
                    f" (or resize its memory now: POST /api/vms/{current.name}/memory/resize, "
                    "`pyhv vm memory NAME --memory SIZE`)"
                    if "memory" in fixed
                    else ""
                )
            ) from None
        raise e
    new = _validated(replace(current, **values))
    if running:
        if new.minimum > current.minimum:
            raise VmSettingsError(
                f"minimum can only go down while VM {current.name!r} runs (from "
                f"{format_size(current.minimum)}, asked {format_size(new.minimum)}): stop the "
                "VM to raise it"
            )
        if new.maximum < current.maximum:
            raise VmSettingsError(
                f"maximum can only go up while VM {current.name!r} runs (from "
                f"{format_size(current.maximum)}, asked {format_size(new.maximum)}): stop the "
                "VM to lower it; to take memory back now, resize it (`pyhv vm memory NAME "
                "--memory SIZE`: hot-remove)"
            )
    return new
