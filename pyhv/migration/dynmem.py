"""Dynamic Memory across a live migration: the memory layout (hot-added regions, the guest's
balloon) and the VMBus channel and DM VSP state.

- Layout, sent in CONFIG: the destination maps the hot-added regions at the same GPAs (through
  its memory manager, so they are accounted) and marks the balloon released before any memory
  arrives; ballooned pages are never sent and stay holes there.
- State, sent with the VP state: the open channel (ring area GPA, pages, split, vector) is
  opened again over the same ring memory, without touching the ring indices the guest and the
  source left there; the VSP goes on in its state with its negotiated version and capabilities
  (no new VERSION/CAPS exchange: the guest does not know it moved).
- The ring pages are re-sent in the final pass: the host's writes to them (read indices, its
  messages) are not in KVM's dirty log.
- A DM operation in flight cannot be carried: the source waits for the VSP to be idle, and the
  migration is abandoned if the balloon or hot-added memory changed during it.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.migration.stream import MigrationError

if TYPE_CHECKING:
    from pyhv.worker.dynmem import DynamicMemoryService

PAGE = 4096


def layout(dm: DynamicMemoryService) -> dict[str, Any]:
    """Hot-added regions and ballooned ranges, now."""
    from pyhv.worker import boot

    part = dm._mm_part
    startup = {(g, s) for g, s in boot.ram_regions(dm.config.memory)}
    return {
        "hot_added": sorted(
            [r.gpa, r.size] for r in part.regions if (r.gpa, r.size) not in startup
        ),
        "ballooned": [[r.start, r.count] for r in part.ballooned],
    }


def activity(dm: DynamicMemoryService) -> tuple[int, ...]:
    """Counts that move whenever DM changes the guest's memory."""
    c = dm.counters
    return (c["ballooned_pages"], c["unballooned_pages"], c["hot_added_pages"], c["timeouts"])


def quiesce(dm: DynamicMemoryService, timeout: float = 10.0) -> None:
    """Before the migration starts: no DM transaction may be in flight."""
    from pyhv.dynmem.vsp import DmState

    if not dm.wait_idle(timeout) or dm.vsp.state in (
        DmState.BALLOON_WAIT,
        DmState.UNBALLOON_WAIT,
        DmState.HOT_ADD_WAIT,
    ):
        raise MigrationError(
            f"a Dynamic Memory operation is in flight ({dm.operation or dm.vsp.state.name}): "
            "migrate once it is done",
            "config",
        )


def ring_ranges(dm: DynamicMemoryService) -> list[tuple[int, int]]:
    """(gpa, pages) of the open channels' ring areas."""
    saved = _channel(dm)
    return [] if saved is None else [(saved["gpa"], saved["pages"])]


def _channel(dm: DynamicMemoryService) -> dict[str, int] | None:
    from pyhv.vmbus.channel import ChannelState

    ch = dm.offer.channel
    if ch is None or ch.state is not ChannelState.OPEN:
        return None
    c = dm.controller
    return {
        "select": c.offers.index(dm.offer),
        "gpa": c._gpa,
        "pages": c._pages,
        "downstream": c._downstream,
        "vector": c._vector,
    }


def save(dm: DynamicMemoryService) -> dict[str, Any]:
    """The channel, VSP and service state (VPs paused, VSP lock held by the caller)."""
    from pyhv.dynmem.vsp import DmState

    vsp = dm.vsp
    if vsp.state in (DmState.BALLOON_WAIT, DmState.UNBALLOON_WAIT, DmState.HOT_ADD_WAIT):
        raise MigrationError(f"a Dynamic Memory operation started: {vsp.state.name}", "state")
    return {
        "layout": layout(dm),
        "channel": _channel(dm),
        "vsp": {
            "state": vsp.state.name,
            "version": vsp.version,
            "caps": None if vsp.caps is None else asdict(vsp.caps),
            "hot_add_disabled": vsp.hot_add_disabled,
            "trans_id": vsp._trans_id,
            "ram": [[r.start, r.count] for r in vsp.ram],
            "ballooned": [[r.start, r.count] for r in vsp.ballooned],
            "counters": dict(vsp.counters),
        },
        "service": {"counters": dict(dm.counters)},
    }


def prepare(dm: DynamicMemoryService, lay: dict[str, Any]) -> None:
    """Destination, before memory arrives: hot-added regions mapped at their GPAs, the
    balloon released."""
    for gpa, size in sorted(lay.get("hot_added") or []):
        region = dm.mm.hot_add(dm.name, size // PAGE, align_pages=gpa // PAGE)
        if region.gpa != gpa or region.size != size:
            raise MigrationError(
                f"hot-added memory {gpa:#x}+{size:#x} could not be mapped at the same GPA here "
                f"(got {region.gpa:#x}+{region.size:#x})",
                "config",
            )
        dm.vsp.ram.add(gpa // PAGE, size // PAGE)
    ballooned = [PageRange(s, n) for s, n in lay.get("ballooned") or []]
    if ballooned:
        dm.mm.release(dm.name, ballooned)


def restore(dm: DynamicMemoryService, saved: dict[str, Any]) -> None:
    """Destination, memory and VP state in place, VPs not started: the channel and the VSP go
    on where they were."""
    from pyhv.dynmem.vsp import DmState, GuestCaps
    from pyhv.vmbus.controller import Command, Reg, Status

    ch = saved.get("channel")
    if ch is not None:
        c = dm.controller
        for reg, value in (
            (Reg.SELECT, ch["select"]),
            (Reg.RING_GPA_LO, ch["gpa"] & 0xFFFFFFFF),
            (Reg.RING_GPA_HI, ch["gpa"] >> 32),
            (Reg.RING_PAGES, ch["pages"]),
            (Reg.DOWNSTREAM_PAGES, ch["downstream"]),
            (Reg.VECTOR, ch["vector"]),
            (Reg.COMMAND, Command.OPEN),
        ):
            c.io_write(reg, value)
        if c.status is not Status.OK:
            raise MigrationError(
                f"the DM channel could not be opened here: {c.status.name}", "state"
            )
    v = saved["vsp"]
    vsp = dm.vsp
    with vsp.lock:
        vsp._state = DmState[v["state"]]
        vsp.version = v["version"]
        vsp.caps = None if v["caps"] is None else GuestCaps(**v["caps"])
        vsp.hot_add_disabled = bool(v["hot_add_disabled"])
        vsp._trans_id = int(v["trans_id"])
        vsp.ram = RangeSet(PageRange(s, n) for s, n in v["ram"])
        vsp.ballooned = RangeSet(PageRange(s, n) for s, n in v["ballooned"])
        vsp.counters.update(v["counters"])
        dm._info_for = vsp.caps  # the guest already has the maximum page count
    dm.counters.update(saved["service"]["counters"])
