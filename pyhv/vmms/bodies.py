"""The VMMS API's request and response bodies, declared once as msgspec Structs
(docs/messages.md): the API decodes every request body against its declaration (a field of the
wrong type, out of its bounds, unknown or missing is a 400 that names it), and the OpenAPI
document's schemas (pyhv.vmms.openapi, docs/openapi.json) are generated from these classes.
A VM's settings (:class:`Settings`, :class:`SettingsChange`) are declared in pyhv.vmms.config,
with the configuration they describe.

The rules across fields and against the host (sizes in whole MiB, minimum <= startup <=
maximum, what may change while a VM runs, the pool) stay in pyhv.vmms.config and the service,
which library callers reach without the API."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

from pyhv.dynmem.status import Health
from pyhv.vmms.config import Settings, SettingsChange, describe_error

# --- request bodies ------------------------------------------------------------------------

#: Bytes, or a size with a unit such as "512M" (checked by pyhv.worker.config.parse_size).
Size = Annotated[int | str, Meta(description="bytes, or a size such as 512M")]


class _Body(Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


class NoFields(_Body):
    """This request takes no fields (an empty object, or no body)."""


class Start(_Body):
    """Start a VM; with ``restart``, stop it first if it runs: a restart, where Smart Paging
    may back startup memory the host's pool cannot give (Dynamic Memory VMs only)."""

    restart: bool = False


class MemoryTarget(_Body):
    """Balloon, unballoon or hot-add towards a target."""

    target: Size


class MemoryResize(_Body):
    """Set-VMMemory -StartupBytes on a running VM: hot-add or hot-remove to `memory` (whole
    2 MiB blocks, within minimum..maximum)."""

    memory: Size


class MigrateRequest(_Body):
    """Live-migrate the running VM to another VMMS."""

    destination: Annotated[
        str, Meta(min_length=1, description="the destination VMMS's TCP API, HOST:PORT")
    ]
    token: Annotated[
        str,
        Meta(
            min_length=1,
            description="the destination VMMS's migration token (its 'migration-token' file: "
            "it can only bring a VM in)",
        ),
    ]
    options: Annotated[
        dict[str, Any],
        Meta(
            description="pyhv.migration MigrationOptions (downtime_target, bandwidth, "
            "compress, encrypt, dirty_limit: pages/s per VP or 'auto', postcopy, "
            "postcopy_after, postcopy_preempt: false sends post-copy's page requests on the "
            "one link instead of an urgent channel, recover_timeout, ...)"
        ),
    ] = msgspec.field(default_factory=dict)


class IncomingRequest(_Body):
    """Prepare to receive a VM (from the source VMMS)."""

    settings: Settings
    memory: Annotated[int, Meta(ge=0, description="the VM's RAM now, bytes (>= startup)")] | (
        UnsetType
    ) = UNSET
    source: str | UnsetType = UNSET


class Resolve(_Body):
    """Settle a migration in doubt: resume the paused VM here (true), or stop and forget it
    here because it runs at the destination (false)."""

    resume: bool


# --- response bodies (what the service answers; tests decode real answers against them) ---


class Error(Struct):
    """What was wrong, and the HTTP status."""

    error: str
    status: int


class VmSettings(Struct):
    """A VM's settings as stored (sizes in bytes)."""

    name: str
    vps: int
    memory: int
    dynamic_memory: bool
    minimum: int
    maximum: int
    buffer: int
    weight: int
    image: str | None
    cmdline: str
    page_file_size: int = 0
    dirty_ring_entries: int = 0
    huge_pages: bool = False


class VmMemory(Struct):
    """Bytes, as the host accounts them (running VMs), and Hyper-V Manager's Memory Demand and
    Memory Status columns (null until the guest's DM driver reported; docs/dynamic-memory.md)."""

    visible: int
    assigned: int
    ballooned: int
    demand: Annotated[int | None, Meta(description="the guest's committed memory, bytes")]
    status: Annotated[
        Health | None,
        Meta(
            description="OK; Low: available memory below the buffer; Warning: demand above "
            "what the VM can be given"
        ),
    ]
    smart_paging: SmartPaging | None = None


class SmartPaging(Struct):
    """Smart Paging (pyhv.vmms.smartpaging): whether part of the VM's memory is backed by its
    Smart Paging file now, how much, the file, and how the last one ended."""

    in_use: bool
    bytes: Annotated[int, Meta(description="guest memory backed by the file, bytes")]
    file: str | None
    file_bytes: Annotated[int | None, Meta(description="disk the file holds, bytes")]
    since_s: float | None
    ended_after_s: Annotated[
        float | None, Meta(description="seconds the last Smart Paging lasted (null: none ended)")
    ]
    moved_bytes: int | None
    paused_us: Annotated[int | None, Meta(description="VPs paused while the pages moved, us")]


VmState = Literal["off", "starting", "running", "stopping", "crashed", "incoming", "paused"]


class Enforcement(Struct):
    """The kernel's figures beside the worker's claims (running VMs; docs/security.md): bytes,
    and how often the claims disagreed."""

    kernel_ram: int | None
    cgroup_limit: int | None
    cgroup_usage: int | None
    overhead: int | None
    claims_disagreements: int
    last_disagreement: str | None


class Vm(Struct):
    """A VM. state incoming: arriving by live migration; paused: a migration in doubt left it
    paused (the reason says what to do)."""

    name: str
    state: VmState
    reason: str
    pid: Annotated[
        int | None, Meta(description="the worker process (in a jail: the jailed process)")
    ]
    uptime_s: float | None
    settings: VmSettings
    migration: Annotated[
        str | None, Meta(description="the migration it is part of while it migrates")
    ]
    memory: VmMemory | UnsetType = UNSET
    enforcement: Enforcement | UnsetType = UNSET
    jail_uid: (
        Annotated[
            int | None, Meta(description="the uid/gid its worker runs as (a VMMS with jails)")
        ]
        | UnsetType
    ) = UNSET


class VmList(Struct):
    vms: list[Vm]


class MemoryStatus(Struct):
    """A VM's memory in bytes as its worker last pushed it (committed and available null until
    the guest reported)."""

    visible: int
    assigned: int
    ballooned: int
    committed: int | None
    available: int | None
    busy: bool
    page_file: Annotated[
        int | None, Meta(description="the guest's page file as it reported it, bytes")
    ] = None
    page_file_writes: Annotated[
        int | None, Meta(description="pages the guest has written to its page file")
    ] = None


class MemoryTargetAccepted(Struct):
    name: str
    target: Size
    accepted: bool


class MemoryResized(Struct):
    """What a runtime resize did (bytes). `complete` is false when the guest gave or took less
    than asked (it cannot vacate memory in use); `startup`, the stored setting, follows
    `visible`, the VM's Guest Visible Physical Memory now."""

    name: str
    asked: int
    before: int
    visible: int
    added: int
    removed: int
    complete: bool
    startup: int


class Migration(Struct):
    """One live migration as this VMMS sees it. Source states: preparing, migrating, then done,
    failed or in-doubt (paused here); destination: waiting, then running or failed."""

    id: str
    direction: Literal["outgoing", "incoming"]
    vm: str
    peer: Annotated[str, Meta(description="the other VMMS or source")]
    state: Literal["preparing", "migrating", "waiting", "done", "running", "failed", "in-doubt"]
    error: str
    progress: Annotated[
        dict[str, Any] | None,
        Meta(
            description="the source worker's latest progress report (phase, passes, "
            "pages_sent, bytes_sent, dirty_pages, bandwidth, ...)"
        ),
    ]
    result: dict[str, Any] | None
    remote_id: Annotated[str, Meta(description="source: the destination's id of this migration")]
    started: float
    ended: float | None


class MigrationList(Struct):
    migrations: list[Migration]


class Incoming(Struct):
    """Where and with which one-time token the source worker connects."""

    id: str
    vm: str
    host: str
    port: int
    token: str


class HostPool(Struct):
    """The host's memory pool for VMs, bytes (free excludes the reserve)."""

    budget: int
    reserve: int
    free: int
    running_vms: int


class ChartCode(Struct):
    """A one-time URL of the chart page: a browser that opens it within a minute gets a
    short-lived cookie for the page (the code is spent)."""

    url: str


class CounterSnapshot(Struct):
    """Every counter by its Perfmon path."""

    time: float
    counters: dict[str, float]


#: Every declared body, in the order of the OpenAPI document's components.
SCHEMAS: tuple[type, ...] = (
    Error,
    Settings,
    SettingsChange,
    NoFields,
    MemoryTarget,
    MemoryResize,
    MigrateRequest,
    IncomingRequest,
    Resolve,
    VmSettings,
    VmMemory,
    Vm,
    VmList,
    MemoryStatus,
    MemoryTargetAccepted,
    MemoryResized,
    Migration,
    MigrationList,
    Incoming,
    HostPool,
    CounterSnapshot,
    ChartCode,
)


class BodyError(ValueError):
    """A request body that does not match its declaration; the text names the field."""


def decode(value: object, kind: type[Any]) -> Any:
    """`value` (a parsed JSON object) as the declared body `kind`, or BodyError."""
    try:
        return msgspec.convert(value, kind, strict=True)
    except msgspec.ValidationError as e:
        raise BodyError(f"the body is not a {kind.__name__}: {describe_error(e)}") from None
    except UnicodeError as e:  # JSON text may hold a lone surrogate ("\ud800"), not UTF-8
        raise BodyError(
            f"the body is not a {kind.__name__}: text that is not Unicode: {e}"
        ) from None


def given(body: Struct) -> dict[str, Any]:
    """The fields the caller gave (unset ones left out), JSON-ready."""
    return msgspec.to_builtins(body)  # type: ignore[no-any-return]
