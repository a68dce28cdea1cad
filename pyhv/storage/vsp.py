"""The storage VSP (Hyper-V's storvsp): serves READ / WRITE / QUERY_PROPERTIES requests from the
guest's storage VSC on one VMBus channel, against a :class:`~pyhv.storage.disk.Disk`.

Every request is checked like every guest input before anything is read or written: its shape
(pyhv.storage.protocol), LBA + sector count within the disk, each PFN of its buffer inside guest
RAM and not ballooned (`usable(pfn)`: the partition's RAM, hot-added included, less the balloon). A
bad one is refused (logged, counted under `counters["refused"]` and the status's name) and
answered with an error status under its request id; the guest's VM goes on. The data moves
straight between the disk and guest memory (`guest_memory(gpa, n)`, a writable view).

Requests are served on the thread that serves the channel's doorbell (the VP's port exit): the
response is in the ring when the guest's doorbell write returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

from pyhv import wire
from pyhv.storage import protocol as sp
from pyhv.storage.disk import Disk, DiskError, DiskState
from pyhv.vmbus.channel import Channel
from pyhv.vmbus.vsp import Vsp, serialized

STORAGE_STATE_VERSION = 1


class StorageState(Enum):
    CLOSED = auto()  # no channel yet
    READY = auto()
    STOPPED = auto()


_S = StorageState
_TRANSITIONS: dict[Enum, frozenset[Enum]] = {
    _S.CLOSED: frozenset({_S.READY}),
    _S.READY: frozenset({_S.READY}),  # the guest reopened the channel
    _S.STOPPED: frozenset({_S.READY}),
}


@dataclass(frozen=True)
class StorageVspState:
    """What the storage VSP carries across a live migration: its disk's written blocks and its
    counters (the channel itself travels with the VMBus controller's state)."""

    version: int
    disk: DiskState
    counters: dict[str, int] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: object) -> StorageVspState:
        st = wire.from_wire(cls, d, "storage VSP state")
        if any(v < 0 for v in st.counters.values()):
            raise ValueError(f"storage VSP counters {st.counters!r} are not counts")
        return st


class StorageVsp(Vsp[StorageState]):
    TRANSITIONS = _TRANSITIONS
    STOPPED = StorageState.STOPPED

    def __init__(
        self,
        disk: Disk,
        guest_memory: Callable[[int, int], memoryview],
        usable: Callable[[int], bool],
        *,
        name: str = "storage",
    ) -> None:
        super().__init__(name, StorageState.CLOSED)
        self.disk = disk
        self._guest_memory = guest_memory
        #: Whether a buffer may name this page frame: guest RAM, not ballooned.
        self._usable = usable
        for k in ("requests", "reads", "writes", "sectors_read", "sectors_written", "refused"):
            self.counters[k] = 0
        self.last_request_ns = 0
        #: Guest pages the host wrote (READs) since begin_dirty_log(), or None when no one
        #: logs: KVM's dirty log does not see the host's own writes, so a live migration sends
        #: these again. At most one entry per guest page.
        self._dirtied: set[int] | None = None

    @serialized
    def begin_dirty_log(self) -> None:
        """Record the guest pages READs write from now on (a migration's first pass)."""
        self._dirtied = set()

    @serialized
    def take_dirtied(self) -> set[int]:
        """The guest page frames READs wrote since begin_dirty_log(); the log stops."""
        out, self._dirtied = self._dirtied or set(), None
        return out

    # -- channel --------------------------------------------------------------------------

    @serialized
    def bind(self, channel: Channel) -> None:
        super().bind(channel)
        # Responses carry the request id as their trans_id: the outbox holds id + payload.
        self.attach(lambda item: channel.try_send(item[8:], int.from_bytes(item[:8], "little")))

    def on_bind(self, channel: Channel) -> None:
        self._to(StorageState.READY, f"channel {channel.relid} opened")

    def _answer(self, trans_id: int, op: int, status: sp.Status, value: int = 0) -> None:
        self.post(
            (trans_id & (2**64 - 1)).to_bytes(8, "little") + sp.encode_response(op, status, value)
        )

    def _bad(self, trans_id: int, op: int, status: sp.Status, why: str) -> None:
        self.counters[status.name.lower()] += 1
        self.refuse(f"request {trans_id}: {why}: answered {status.name}")
        if not self.stopped:
            self._answer(trans_id, op, status)

    # -- requests -------------------------------------------------------------------------

    def on_message(self, payload: bytes, trans_id: int) -> None:
        t0 = time.perf_counter_ns()
        self.counters["requests"] += 1
        op = int.from_bytes(payload[:2], "little") if len(payload) >= 2 else 0
        try:
            req = sp.decode_request(payload)
        except sp.StorageDecodeError as e:
            self._bad(trans_id, op, e.status, str(e))
            return
        if req.operation == sp.Operation.QUERY_PROPERTIES:
            self.accepted()
            self._answer(trans_id, op, sp.Status.SUCCESS, self.disk.sectors)
            return
        if req.lba + req.sector_count > self.disk.sectors:
            self._bad(
                trans_id,
                op,
                sp.Status.LBA_OUT_OF_RANGE,
                f"LBA {req.lba} + {req.sector_count} sectors is beyond the disk's "
                f"{self.disk.sectors} sectors",
            )
            return
        for pfn in req.pfns:
            if not self._usable(pfn):
                self._bad(
                    trans_id,
                    op,
                    sp.Status.BAD_BUFFER,
                    f"buffer page {pfn:#x} (GPA {pfn * sp.PAGE_SIZE:#x}) is not guest RAM "
                    "or is ballooned",
                )
                return
        try:
            if req.operation == sp.Operation.READ:
                self._read(req)
            elif req.operation == sp.Operation.WRITE:
                self._write(req)
            else:
                self.disk.unmap(req.lba * sp.SECTOR_SIZE, req.byte_count)
                self.counters["unmaps"] += 1
                self.counters["sectors_unmapped"] += req.sector_count
        except (DiskError, OSError, ValueError) as e:
            self._bad(trans_id, op, sp.Status.IO_ERROR, f"the disk failed: {e}")
            return
        self.accepted()
        self._answer(trans_id, op, sp.Status.SUCCESS, req.byte_count)
        self.last_request_ns = time.perf_counter_ns() - t0

    def _pieces(self, req: sp.Request) -> list[tuple[int, int]]:
        """The buffer as (GPA, bytes) pieces, one per page."""
        out, left, off = [], req.byte_count, req.byte_offset
        for pfn in req.pfns:
            n = min(sp.PAGE_SIZE - off, left)
            out.append((pfn * sp.PAGE_SIZE + off, n))
            left -= n
            off = 0
        return out

    def _read(self, req: sp.Request) -> None:
        data = memoryview(self.disk.read(req.lba * sp.SECTOR_SIZE, req.byte_count))
        pos = 0
        for gpa, n in self._pieces(req):
            self._guest_memory(gpa, n)[:] = data[pos : pos + n]
            pos += n
        if self._dirtied is not None:
            self._dirtied.update(req.pfns)
        self.counters["reads"] += 1
        self.counters["sectors_read"] += req.sector_count

    def _write(self, req: sp.Request) -> None:
        data = b"".join(bytes(self._guest_memory(gpa, n)) for gpa, n in self._pieces(req))
        self.disk.write(req.lba * sp.SECTOR_SIZE, data)
        self.counters["writes"] += 1
        self.counters["sectors_written"] += req.sector_count

    # -- save / restore -------------------------------------------------------------------

    @serialized
    def save(self) -> StorageVspState:
        """The disk's written blocks and the counters (DiskError if too many to carry)."""
        return StorageVspState(STORAGE_STATE_VERSION, self.disk.save(), dict(self.counters))

    def check(self, st: StorageVspState) -> None:
        if st.version != STORAGE_STATE_VERSION:
            raise ValueError(
                f"storage VSP state version {st.version!r} is not {STORAGE_STATE_VERSION}"
            )
        self.disk.check(st.disk)

    @serialized
    def restore(self, st: StorageVspState) -> None:
        """The source's blocks into this disk and its counters (checked first)."""
        self.check(st)
        self.disk.restore(st.disk)
        self.counters.update(st.counters)
