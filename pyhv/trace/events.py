"""The flight recorder's events, declared once: one slotted dataclass per kind, with its wire
form (a JSON object whose "kind" names the class) checked field by field on the way in, and a
one-line human rendering.

`t` is the wall-clock time of the event in seconds (time.time()); `vp` is the VP index (-1 for
events no VP caused). Values the guest chose (ports, GPAs, MSRs, DM fields) are ints, as seen.
Events are not changed once made; they are not frozen only because a frozen dataclass costs five
times as much to make (1 us against 0.2 us here), on a VP's thread for every traced exit.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar


class TraceError(ValueError):
    """An event or a trace file that is not what the recorder writes."""


@dataclass(slots=True)
class Event:
    """Fields every event has."""

    kind: ClassVar[str] = ""
    t: float
    vp: int

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out

    def describe(self) -> str:
        """The event's own fields, for a human line (time, VP and kind are added around it)."""
        return " ".join(
            f"{f.name}={_show(f.name, getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.name not in ("t", "vp")
        )

    def line(self) -> str:
        """time (local, to the microsecond), VP, kind, the event's fields."""
        vp = f"vp{self.vp}" if self.vp >= 0 else "-"
        clock = time.strftime("%H:%M:%S", time.localtime(self.t))
        return f"{clock}.{int(self.t % 1 * 1e6):06d} {vp:>4} {self.kind:9} {self.describe()}"


_HEX = {"port", "gpa", "msr", "value"}


def _show(name: str, v: Any) -> str:
    if name in _HEX and isinstance(v, int) and not isinstance(v, bool):
        return hex(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_show(k, x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + " ".join(f"{s:#x}+{n}" for s, n in v) + "]"
    return str(v)


# --------------------------------------------------------------------------- intercepts
@dataclass(slots=True)
class IoEvent(Event):
    """A port I/O intercept: the access and what its handler answered (for reads)."""

    kind: ClassVar[str] = "io"
    port: int
    direction: str  # "in" or "out"
    size: int
    count: int
    value: int
    handler_ns: int


@dataclass(slots=True)
class MmioEvent(Event):
    """A GPA access intercept (MMIO)."""

    kind: ClassVar[str] = "mmio"
    gpa: int
    direction: str  # "read" or "write"
    size: int
    value: int
    handler_ns: int


@dataclass(slots=True)
class MsrEvent(Event):
    """An RDMSR/WRMSR intercept; `gp` when the handler injected #GP."""

    kind: ClassVar[str] = "msr"
    msr: int
    direction: str  # "read" or "write"
    value: int
    gp: bool
    handler_ns: int


# --------------------------------------------------------------------------- VMBus, DM
@dataclass(slots=True)
class VmbusEvent(Event):
    """One VMBus packet on a channel, either way."""

    kind: ClassVar[str] = "vmbus"
    channel: str  # the VSP serving it
    direction: str  # "guest->host" or "host->guest"
    type: int  # VMBus packet type (6 = inband data)
    length: int  # payload bytes
    trans_id: int


@dataclass(slots=True)
class DmEvent(Event):
    """One Dynamic Memory message, decoded field by field (pyhv.dynmem.protocol): `fields`
    are its fixed part without the header and reserved bits, `ranges` its page ranges
    ([start page, page count]) if it carries any."""

    kind: ClassVar[str] = "dm"
    direction: str
    message: str  # MessageType name, e.g. "STATUS_REPORT"
    trans_id: int
    fields: dict[str, Any]
    ranges: list[list[int]]


# --------------------------------------------------------------------------- VMMS, migration
@dataclass(slots=True)
class BalancerEvent(Event):
    """One balancer decision for this VM (made in the VMMS)."""

    kind: ClassVar[str] = "balancer"
    action: str  # "add", "remove" or "none"
    pages: int
    pressure: int  # committed / assigned x 100
    assigned: int  # pages
    target: int  # pages the balancer wants the VM to have


@dataclass(slots=True)
class MigrationEvent(Event):
    """A live migration phase change, with the totals so far."""

    kind: ClassVar[str] = "migration"
    role: str  # "source" or "destination"
    phase: str
    bytes: int
    pages: int


@dataclass(slots=True)
class DirtyRateEvent(Event):
    """A VP's dirty rate during a migration of a VM with the dirty ring (pages/s over the last
    second), the dirty limit in force (pages/s, 0: none) and how long the VP slept for it."""

    kind: ClassVar[str] = "dirtyrate"
    pages_per_s: float
    limit: int
    throttled_ms: float


@dataclass(slots=True)
class DroppedEvent(Event):
    """`count` events were lost because their reader did not keep up."""

    kind: ClassVar[str] = "dropped"
    count: int


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (
        IoEvent,
        MmioEvent,
        MsrEvent,
        VmbusEvent,
        DmEvent,
        BalancerEvent,
        MigrationEvent,
        DirtyRateEvent,
        DroppedEvent,
    )
}
#: The kinds a reader may ask for (`--only`); "dropped" always comes through.
KINDS = tuple(k for k in EVENT_TYPES if k != "dropped")


#: The latest event time read (year 2242): a time.time() any host's clock gives, which
#: time.localtime can show.
MAX_TIME = 1 << 33


def _fits(annotation: str, v: Any) -> bool:
    if annotation == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if annotation == "float":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if annotation == "str":
        return isinstance(v, str) and len(v) <= 200
    if annotation == "bool":
        return isinstance(v, bool)
    if annotation == "list[list[int]]":
        return isinstance(v, list) and all(
            isinstance(r, list) and len(r) == 2 and all(_fits("int", x) for x in r) for r in v
        )
    if annotation == "dict[str, Any]":
        return isinstance(v, dict) and all(
            isinstance(k, str) and (_fits("int", x) or isinstance(x, bool) or _fits("str", x))
            for k, x in v.items()
        )
    return False


def event_from_wire(d: object) -> Event:
    """The event a wire object describes; TraceError saying what is wrong otherwise."""
    if not isinstance(d, dict):
        raise TraceError(f"an event is a JSON object, not {type(d).__name__}")
    kind = d.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise TraceError(f"unknown event kind {kind!r}: known are {', '.join(EVENT_TYPES)}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    extra = set(d) - names - {"kind"}
    if extra:
        raise TraceError(f"{kind} event has unknown fields {sorted(extra)}")
    values = {}
    for f in fields:
        if f.name not in d:
            raise TraceError(f"{kind} event lacks its field {f.name!r}")
        v = d[f.name]
        if not _fits(str(f.type), v):
            raise TraceError(f"{kind} event field {f.name}={v!r:.60} is not a {f.type}")
        values[f.name] = v
    t = values["t"]
    if not 0 <= t <= MAX_TIME:  # NaN too; line() could not show it (time.localtime overflows)
        raise TraceError(f"{kind} event time t={t!r:.60} is not a time.time() in 0..{MAX_TIME}")
    return cls(**values)


def parse_only(text: str | None) -> frozenset[str] | None:
    """`--only dm,io`: the kinds asked for (None = all); TraceError for an unknown one."""
    if not text:
        return None
    kinds = frozenset(k.strip() for k in text.split(",") if k.strip())
    unknown = sorted(kinds - set(KINDS))
    if unknown or not kinds:
        raise TraceError(
            f"--only {text!r}: unknown kind {', '.join(unknown) or '(none)'}; "
            f"choose among {','.join(KINDS)}"
        )
    return kinds
