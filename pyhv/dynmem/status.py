"""A VM's Dynamic Memory status: the one type that carries it from the VSP to the balancer and
the counters, and its wire form.

The DM VSP builds a :class:`MemoryStatus` when the guest's status report arrives; the worker
completes it with its memory manager's figures and its counters and pushes it to the VMMS as
``{"ev": "memory_status", "status": status.to_wire()}``; the VMMS decodes it with
:meth:`MemoryStatus.from_wire` (a worker is untrusted: every field is checked, a bad one is
refused with :class:`StatusError`), keeps the latest per VM, and its balancer tick and counters
read that. All memory is in 4 KiB pages, the unit of the protocol.

Pressure and the buffered target are computed here and only here (:func:`pressure_percent`,
:func:`buffered_pages`, :func:`target_pages`), for one VM and for the balancer's numpy columns
alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

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


def _count(where: str, name: str, value: object, limit: int = MAX_PAGES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise StatusError(f"{where}: {name} must be a whole number in 0..{limit}, got {value!r}")
    return value


def _seconds(where: str, name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise StatusError(f"{where}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _mapping(where: str, raw: object, names: tuple[str, ...]) -> Mapping[str, object]:
    if not isinstance(raw, Mapping):
        raise StatusError(f"{where} must be an object, got {type(raw).__name__}")
    extra = set(raw) - set(names)
    missing = set(names) - set(raw)
    if extra or missing:
        raise StatusError(
            f"{where} must have exactly the fields {', '.join(names)}"
            + (f"; unknown: {sorted(map(str, extra))}" if extra else "")
            + (f"; missing: {sorted(missing)}" if missing else "")
        )
    return raw


@dataclass(frozen=True, slots=True)
class VspCounters:
    """What the VM's DM VSP and its worker service have counted since the VM started."""

    status_reports: int = 0
    messages_accepted: int = 0
    messages_refused: int = 0
    bad_ranges: int = 0
    transitions: int = 0
    resets: int = 0
    timeouts: int = 0
    ballooned_pages: int = 0
    unballooned_pages: int = 0
    hot_added_pages: int = 0
    doorbells: int = 0
    controller_refused: int = 0

    def to_wire(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, raw: object) -> VspCounters:
        names = tuple(f.name for f in fields(cls))
        m = _mapping("memory status vsp", raw, names)
        return cls(**{n: _count("memory status vsp", n, m[n], 1 << 62) for n in names})


@dataclass(frozen=True, slots=True)
class VpCounters:
    """One virtual processor's intercepts since it started, per kind (the hypervisor's
    InterceptKind), and the handlers' defaults, errors and time."""

    vp: int
    io_port: int = 0
    memory: int = 0
    msr: int = 0
    exception: int = 0
    execute: int = 0
    halt: int = 0
    unknown: int = 0
    defaulted: int = 0
    errors: int = 0
    handler_seconds: float = 0.0

    def to_wire(self) -> dict[str, int | float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_wire(cls, raw: object) -> VpCounters:
        names = tuple(f.name for f in fields(cls))
        m = _mapping("memory status vps[]", raw, names)
        where = "memory status vps[]"
        values: dict[str, Any] = {n: _count(where, n, m[n], 1 << 62) for n in names[:-1]}
        values["handler_seconds"] = _seconds(where, "handler_seconds", m["handler_seconds"])
        if values["vp"] >= 1024:
            raise StatusError(f"{where}: vp must be a VP index below 1024, got {values['vp']}")
        return cls(**values)


@dataclass(frozen=True, slots=True)
class MemoryStatus:
    """A VM's memory when its guest last reported (or when an operation last changed it).

    Memory, as the worker's memory manager accounts it: `visible_pages` (Guest Visible Physical
    Memory: startup plus hot-added, grows only), `assigned_pages` (Physical Memory: what the host
    backs = visible - ballooned), `ballooned_pages`. The guest's report: `committed_pages` is the
    VM's demand (the guest's num_committed, `guest_committed_pages`, less the pages the host
    holds ballooned, which the guest counts as committed), `available_pages` its num_avail; all
    three None until the guest's DM driver has reported. `busy`: a goal or a DM transaction is
    in flight. `reported_at`: the worker's time.time() of the report. `vsp`, `vps`: the VSP's
    and the VPs' counters, pushed with the status."""

    visible_pages: int
    assigned_pages: int
    ballooned_pages: int
    committed_pages: int | None = None
    available_pages: int | None = None
    guest_committed_pages: int | None = None
    busy: bool = False
    reported_at: float = 0.0
    vsp: VspCounters = field(default_factory=VspCounters)
    vps: tuple[VpCounters, ...] = ()

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

    # --- wire form: the one place it is written and read ------------------------------

    def to_wire(self) -> dict[str, Any]:
        """JSON-ready, field by field."""
        return {
            "version": WIRE_VERSION,
            "visible_pages": self.visible_pages,
            "assigned_pages": self.assigned_pages,
            "ballooned_pages": self.ballooned_pages,
            "committed_pages": self.committed_pages,
            "available_pages": self.available_pages,
            "guest_committed_pages": self.guest_committed_pages,
            "busy": self.busy,
            "reported_at": self.reported_at,
            "vsp": self.vsp.to_wire(),
            "vps": [vp.to_wire() for vp in self.vps],
        }

    @classmethod
    def from_wire(cls, raw: object) -> MemoryStatus:
        """The status a worker sent; StatusError names the first field that is wrong."""
        names = (
            "version",
            "visible_pages",
            "assigned_pages",
            "ballooned_pages",
            "committed_pages",
            "available_pages",
            "guest_committed_pages",
            "busy",
            "reported_at",
            "vsp",
            "vps",
        )
        m = _mapping("memory status", raw, names)
        w = "memory status"
        if m["version"] != WIRE_VERSION:
            raise StatusError(
                f"{w}: version {m['version']!r} is not {WIRE_VERSION}: the worker runs another "
                "pyhv; restart the VM with this host's pyhv"
            )
        visible = _count(w, "visible_pages", m["visible_pages"])
        assigned = _count(w, "assigned_pages", m["assigned_pages"])
        ballooned = _count(w, "ballooned_pages", m["ballooned_pages"])
        if assigned + ballooned != visible:
            raise StatusError(
                f"{w}: assigned_pages {assigned} + ballooned_pages {ballooned} must equal "
                f"visible_pages {visible}"
            )
        report = [m[k] for k in ("committed_pages", "available_pages", "guest_committed_pages")]
        if any(v is None for v in report) and any(v is not None for v in report):
            raise StatusError(
                f"{w}: committed_pages, available_pages and guest_committed_pages are all "
                f"numbers (the guest reported) or all null, got {report!r}"
            )
        committed = available = guest = None
        if report[0] is not None:
            committed = _count(w, "committed_pages", m["committed_pages"])
            available = _count(w, "available_pages", m["available_pages"])
            guest = _count(w, "guest_committed_pages", m["guest_committed_pages"])
        if not isinstance(m["busy"], bool):
            raise StatusError(f"{w}: busy must be true or false, got {m['busy']!r}")
        vps = m["vps"]
        if not isinstance(vps, list) or len(vps) > 1024:
            raise StatusError(f"{w}: vps must be a list of at most 1024 VPs, got {vps!r:.80}")
        return cls(
            visible_pages=visible,
            assigned_pages=assigned,
            ballooned_pages=ballooned,
            committed_pages=committed,
            available_pages=available,
            guest_committed_pages=guest,
            busy=m["busy"],
            reported_at=_seconds(w, "reported_at", m["reported_at"]),
            vsp=VspCounters.from_wire(m["vsp"]),
            vps=tuple(VpCounters.from_wire(v) for v in vps),
        )
