"""A VM's Dynamic Memory status: the one type that carries it from the VSP to the balancer and
the counters, and its wire form.

The DM VSP builds a :class:`MemoryStatus` when the guest's status report arrives; the worker
completes it with its memory manager's figures and its counters and pushes it to the VMMS in
a declared message (pyhv.worker.messages.MemoryStatusPushed). The types are msgspec Structs:
the VMMS decodes what a worker sends against them (a worker is untrusted: every field is
checked by its declared type and bounds, the rest by :meth:`MemoryStatus.check`; a bad one is
refused with a message naming the field), keeps the latest per VM, and its balancer tick and
counters read that. All memory is in 4 KiB pages, the unit of the protocol.

Pressure and the buffered target are computed here and only here (:func:`pressure_percent`,
:func:`buffered_pages`, :func:`target_pages`), for one VM and for the balancer's numpy columns
alike; so is Hyper-V Manager's Memory Status column (:func:`memory_health`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt
from msgspec import Meta, Struct, ValidationError, convert, field, to_builtins

#: The version of the wire form; a worker that sends another one is refused.
WIRE_VERSION = 1
#: More pages than a 52-bit physical address space holds: no real figure comes near it.
MAX_PAGES = 1 << 40

_N = TypeVar("_N", int, npt.NDArray[np.int64])


def buffered_pages(committed_pages: _N, buffer_percent: _N | int) -> _N:
    """Demand plus the buffer: committed x (100 + buffer %) / 100, rounded up."""
    return (committed_pages * (100 + buffer_percent) + 99) // 100  # type: ignore[no-any-return]


def target_pages(
    committed_pages: _N, buffer_percent: _N | int, minimum_pages: _N | int, maximum_pages: _N | int
) -> _N:
    """The memory the balancer aims at: the buffered demand, clamped to [minimum, maximum]."""
    return np.clip(buffered_pages(committed_pages, buffer_percent), minimum_pages, maximum_pages)  # type: ignore[no-any-return]


def pressure_percent(committed_pages: _N, assigned_pages: _N | int) -> Any:
    """Pressure = demand / assigned x 100 (a float, or a float column)."""
    return committed_pages * 100.0 / np.maximum(assigned_pages, 1)


#: Hyper-V Manager's Memory Status column (docs/dynamic-memory.md, "Memory Demand and Memory
#: Status"), and its gauge value under "Hyper-V Dynamic Memory VM\Memory Status".
Health = Literal["OK", "Low", "Warning"]
HEALTH_GAUGE: dict[Health, int] = {"OK": 0, "Low": 1, "Warning": 2}


def memory_health(
    committed_pages: int,
    assigned_pages: int,
    buffer_percent: int,
    maximum_pages: int,
    host_free_pages: int,
) -> Health:
    """Hyper-V's Memory Status of a VM whose guest reported. The most it can have soon is what
    it has plus what the host can still give it (the free pool, up to its maximum): Warning
    when that is below its demand (the guest commits more than it can be given: it pages, or
    would), Low when it is below demand plus the buffer (its available memory is below its
    buffer), else OK. A shortfall the host is about to fill is OK, as in Hyper-V."""
    room = max(0, min(maximum_pages - assigned_pages, host_free_pages))
    reach = assigned_pages + room
    if committed_pages > reach:
        return "Warning"
    if buffered_pages(committed_pages, buffer_percent) > reach:
        return "Low"
    return "OK"


class Limits(Protocol):
    """What a target needs of a VM's settings (pyhv.dynmem.balancer.MemorySettings has it)."""

    @property
    def buffer_percent(self) -> int: ...
    @property
    def minimum_pages(self) -> int: ...
    @property
    def maximum_pages(self) -> int: ...


class StatusError(ValueError):
    """A memory status (from a worker) that is not one: the message names the field and value."""


#: A count of pages: a whole number in 0..MAX_PAGES (a bool is not a number here).
Pages = Annotated[int, Meta(ge=0, le=MAX_PAGES)]
#: A cumulative count of events since the VM started.
Count = Annotated[int, Meta(ge=0, le=1 << 62)]
#: Seconds: finite (NaN and infinity are refused by the bounds) and not negative.
Seconds = Annotated[float, Meta(ge=0.0, le=1e12)]


class VspCounters(Struct, frozen=True, forbid_unknown_fields=True):
    """What the VM's DM VSP and its worker service have counted since the VM started."""

    status_reports: Count = 0
    messages_accepted: Count = 0
    messages_refused: Count = 0
    bad_ranges: Count = 0
    transitions: Count = 0
    resets: Count = 0
    timeouts: Count = 0
    ballooned_pages: Count = 0
    unballooned_pages: Count = 0
    hot_added_pages: Count = 0
    hot_removed_pages: Count = 0
    #: hot-remove ranges refused, and responses with no request outstanding
    hot_remove_refused: Count = 0
    doorbells: Count = 0
    controller_refused: Count = 0


class VpCounters(Struct, frozen=True, forbid_unknown_fields=True):
    """One virtual processor's intercepts since it started, per kind (the hypervisor's
    InterceptKind), and the handlers' defaults, errors and time."""

    vp: Annotated[int, Meta(ge=0, lt=1024)]
    io_port: Count = 0
    memory: Count = 0
    msr: Count = 0
    exception: Count = 0
    execute: Count = 0
    halt: Count = 0
    unknown: Count = 0
    defaulted: Count = 0
    errors: Count = 0
    handler_seconds: Seconds = 0.0


class MemoryStatus(Struct, frozen=True, forbid_unknown_fields=True):
    """A VM's memory when its guest last reported (or when an operation last changed it).

    Memory, as the worker's memory manager accounts it: `visible_pages` (Guest Visible Physical
    Memory: startup plus hot-added, grows only), `assigned_pages` (Physical Memory: what the host
    backs = visible - ballooned - smart paging), `ballooned_pages`, `smart_paging_pages` (in
    the Smart Paging file). The guest's report: `committed_pages` is the
    VM's demand (the guest's num_committed, `guest_committed_pages`, less the pages the host
    holds ballooned, which the guest counts as committed), `available_pages` its num_avail; all
    three None until the guest's DM driver has reported (and `page_file_pages`,
    `page_file_writes`: its page file, 0 until then). `busy`: a goal or a DM transaction is
    in flight. `reported_at`: the worker's time.time() of the report. `vsp`, `vps`: the VSP's
    and the VPs' counters, pushed with the status."""

    visible_pages: Pages
    assigned_pages: Pages
    ballooned_pages: Pages
    committed_pages: Pages | None = None
    available_pages: Pages | None = None
    guest_committed_pages: Pages | None = None
    busy: bool = False
    reported_at: Seconds = 0.0
    vsp: VspCounters = field(default_factory=VspCounters)
    vps: Annotated[tuple[VpCounters, ...], Meta(max_length=1024)] = ()
    #: The guest's page file as its last report said: size (pages) and pages written to it
    #: (dm_status page_file_size, page_file_writes; 0 for a guest without one).
    page_file_pages: Pages = 0
    page_file_writes: Count = 0
    #: The version of the wire form (WIRE_VERSION); check() refuses another.
    version: int = WIRE_VERSION
    #: Pages backed by the Smart Paging file (not host memory, not in `assigned_pages`).
    smart_paging_pages: Pages = 0

    @property
    def reported(self) -> bool:
        """The guest's DM driver has sent a status report."""
        return self.committed_pages is not None

    @property
    def pressure(self) -> float | None:
        """Demand / assigned x 100, None before the guest reported."""
        if self.committed_pages is None:
            return None
        return float(pressure_percent(self.committed_pages, self.assigned_pages))

    def target_pages(self, settings: Limits) -> int:
        """What the balancer aims at for this VM (its assigned memory if it has not reported)."""
        if self.committed_pages is None:
            return self.assigned_pages
        return int(
            target_pages(
                self.committed_pages,
                settings.buffer_percent,
                settings.minimum_pages,
                settings.maximum_pages,
            )
        )

    def health(self, settings: Limits, host_free_pages: int) -> Health | None:
        """Hyper-V's Memory Status (:func:`memory_health`), None before the guest reported."""
        if self.committed_pages is None:
            return None
        return memory_health(
            self.committed_pages,
            self.assigned_pages,
            settings.buffer_percent,
            settings.maximum_pages,
            host_free_pages,
        )

    # --- wire form: declared by the fields above; what types cannot say, check() says ----

    def check(self) -> MemoryStatus:
        """The checks across fields (after the types' own): StatusError names what is wrong."""
        w = "memory status"
        if self.version != WIRE_VERSION:
            raise StatusError(
                f"{w}: version {self.version!r} is not {WIRE_VERSION}: the worker runs another "
                "pyhv; restart the VM with this host's pyhv"
            )
        paged = self.smart_paging_pages
        if self.assigned_pages + self.ballooned_pages + paged != self.visible_pages:
            raise StatusError(
                f"{w}: assigned_pages {self.assigned_pages} + ballooned_pages "
                f"{self.ballooned_pages} + smart_paging_pages {paged} must equal "
                f"visible_pages {self.visible_pages}"
            )
        report = [self.committed_pages, self.available_pages, self.guest_committed_pages]
        if any(v is None for v in report) and any(v is not None for v in report):
            raise StatusError(
                f"{w}: committed_pages, available_pages and guest_committed_pages are all "
                f"numbers (the guest reported) or all null, got {report!r}"
            )
        return self

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready, field by field."""
        return to_builtins(self)  # type: ignore[no-any-return]

    @classmethod
    def from_wire(cls, raw: object) -> MemoryStatus:
        """The status a worker sent; StatusError names the first field that is wrong."""
        try:
            status = convert(raw, cls, strict=True)
        except ValidationError as e:
            raise StatusError(f"memory status: {e}") from None
        return status.check()
