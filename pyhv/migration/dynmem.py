"""Dynamic Memory across a live migration: the memory layout (hot-added regions, the guest's
balloon) and the VMBus channel and DM VSP state. The components save and restore themselves
(pyhv.worker.dynmem's DynamicMemoryService over the memory manager, the VMBus controller and the
DM VSP); this module only says when.

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

from typing import TYPE_CHECKING, Any

from pyhv.memory.manager import MemoryManagerError, MemoryState
from pyhv.migration.stream import MigrationError
from pyhv.vmbus.vsp import VspError

if TYPE_CHECKING:
    from pyhv.worker.dynmem import DynamicMemoryService, DynamicMemoryState


def layout(dm: DynamicMemoryService) -> dict[str, Any]:
    """Hot-added regions and ballooned ranges, now."""
    return dm.save_memory().to_wire()


def activity(dm: DynamicMemoryService) -> tuple[int, ...]:
    """Counts that move whenever DM changes the guest's memory."""
    c = dm.counters
    return (
        c["ballooned_pages"],
        c["unballooned_pages"],
        c["hot_added_pages"],
        c["timeouts"],
        c["hot_removed_pages"],
    )


def quiesce(dm: DynamicMemoryService, timeout: float = 10.0) -> None:
    """Before the migration starts: no DM transaction may be in flight."""
    if not dm.wait_idle(timeout) or dm.vsp.state.waiting:
        raise MigrationError(
            f"a Dynamic Memory operation is in flight ({dm.operation or dm.vsp.state.name}): "
            "migrate once it is done",
            "config",
        )


def save(dm: DynamicMemoryService) -> DynamicMemoryState:
    """The channel, VSP and service state (VPs paused, VSP frozen by the caller)."""
    try:
        return dm.save()
    except VspError as e:
        raise MigrationError(str(e), "state") from None


def ring_ranges(state: DynamicMemoryState) -> list[tuple[int, int]]:
    """(gpa, pages) of the open channels' ring areas."""
    return [(c.ring_gpa, c.ring_pages) for c in state.channel.channels]


def prepare(dm: DynamicMemoryService, wire: object) -> None:
    """Destination, before memory arrives: hot-added regions mapped at their GPAs, the
    balloon released."""
    try:
        dm.restore_memory(MemoryState.from_wire(wire))
    except MemoryManagerError as e:
        raise MigrationError(
            f"the Dynamic Memory layout does not fit here: {e}", "config"
        ) from None
