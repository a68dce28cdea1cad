"""Fuzz targets of Dynamic Memory: the message decoder (pyhv.dynmem.protocol.decode) and the
VSP's state machine fed sequences of guest messages mixed with the host's own requests."""

from __future__ import annotations

import struct

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import DmVspState, DynamicMemoryVsp
from pyhv.memory.ranges import PageRange, RangeSet
from pyhv.trace.events import Event, event_from_wire
from pyhv.vmbus.packet import Packet, PacketType
from pyhv.vmbus.vsp import VspError
from tests.support.fuzz import Reader, Target, blob

RAM_PAGES = 1 << 16  # 256 MiB at GPA 0


def guest_messages() -> dict[str, bytes]:
    """One valid message of each kind a guest sends (and the host's, which a guest may echo)."""
    e = p.encode
    return {
        "version": e(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10), trans_id=7),
        "version_win7": e(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN7)),
        "caps": e(
            T.CAPABILITIES_REPORT,
            p.DmCapabilities(
                balloon=1,
                hot_add=1,
                hot_add_alignment=7,
                min_page_cnt=1024,
                max_page_number=1 << 20,
            ),
        ),
        "caps_hot_remove": e(
            T.CAPABILITIES_REPORT,
            p.DmCapabilities(balloon=1, hot_add=1, hot_add_alignment=1, hot_remove=1),
        ),
        "hot_remove_blocks": e(
            T.MEM_HOT_REMOVE_RESPONSE,
            p.DmHotRemoveResponse(result=1),
            ranges=[PageRange(0x2000, 512), PageRange(0x2000, 512), PageRange(0x3000, 1024)],
        ),
        "status": e(T.STATUS_REPORT, p.DmStatus(num_avail=30000, num_committed=20000)),
        "balloon_response": e(
            T.BALLOON_RESPONSE,
            p.DmBalloonResponse(more_pages=0),
            ranges=[PageRange(0x1000, 16), PageRange(0x2000, 48)],
        ),
        "balloon_response_more": e(
            T.BALLOON_RESPONSE, p.DmBalloonResponse(more_pages=1), ranges=[PageRange(0x3000, 8)]
        ),
        "unballoon_response": e(T.UNBALLOON_RESPONSE, p.DmUnballoonResponse()),
        "hot_add_response": e(T.MEM_HOT_ADD_RESPONSE, p.DmHotAddResponse(page_count=512, result=1)),
        # host -> guest messages, which a guest might send back
        "balloon": e(T.BALLOON_REQUEST, p.DmBalloon(num_pages=64)),
        "unballoon": e(T.UNBALLOON_REQUEST, p.DmUnballoonRequest(), ranges=[PageRange(0x1000, 16)]),
        "hot_add": e(
            T.MEM_HOT_ADD_REQUEST,
            p.DmHotAdd(range=p.DmMemPageRange(start_page=1 << 18, page_cnt=512)),
        ),
        "hot_add_region": e(T.MEM_HOT_ADD_REQUEST, p.DmHotAddWithRegion()),
        "info": e(T.INFO_MESSAGE, p.DmInfoMsg(), info=p.info_max_page_count(1 << 20)),
        "hot_remove": e(T.MEM_HOT_REMOVE_REQUEST, p.DmHotRemove(page_count=4)),
        "hot_remove_response": e(
            T.MEM_HOT_REMOVE_RESPONSE, p.DmHotRemoveResponse(), ranges=[PageRange(5, 5)]
        ),
    }


# --- the message decoder ---------------------------------------------------------------------


def decode_message(data: bytes) -> None:
    msg = p.decode(data)
    fields = msg.fields()  # what the flight recorder shows of it
    assert all(isinstance(v, int) for v in fields.values())
    # what decodes is what its declaration says: encoding it again gives the same message
    size = msg.body.hdr.size
    again = p.encode(
        msg.type,
        type(msg.body).from_buffer_copy(bytes(msg.body)),
        trans_id=msg.trans_id,
        ranges=list(msg.ranges),
        info=msg.info,
    )
    assert again == data[:size], "decode and encode disagree"


PROTOCOL = Target(
    "dynmem.protocol",
    "Dynamic Memory message decoder (pyhv.dynmem.protocol.decode)",
    lambda: [m + pad for m in guest_messages().values() for pad in (b"", bytes(4))],
    decode_message,
    (p.DmDecodeError,),
    max_size=p.MAX_MESSAGE + 64,
)


# --- the VSP fed a sequence ---------------------------------------------------------------------

GUEST, BALLOON, UNBALLOON, GOAL, TICK, HOT_ADD, RESET, ROOM, SAVE, RAW, HOT_REMOVE = range(11)


class _Host:
    """A VSP over a ring whose room the program sets, a clock the program moves, and a host
    that backs what it is asked to (reclaim, map_hot_add)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.room = 1 << 30
        self.vsp = self.make()

    def make(self, ram: RangeSet | None = None) -> DynamicMemoryVsp:
        return DynamicMemoryVsp(
            RangeSet([(0, RAM_PAGES)]) if ram is None else ram,
            self.send,
            assigned_pages=lambda: self.vsp.ram.pages - self.vsp.ballooned.pages,
            reclaim=lambda ranges: None,
            map_hot_add=self.map_hot_add,
            on_hot_removed=lambda ranges: None,
            host_pages=lambda: [PageRange(0x100, 6)],
            op_timeout=5.0,
            clock=lambda: self.now,
        )

    def map_hot_add(self, pages: int, align: int) -> PageRange:
        end = max(r.end for r in self.vsp.ram)
        return PageRange(-(-end // align) * align, pages)

    def send(self, raw: bytes) -> bool:
        if self.room <= 0:
            return False
        self.room -= 1
        p.decode(raw)  # what the host sends always decodes
        return True


def _record(e: Event) -> None:
    """The flight recorder's listener (pyhv.trace): each event as `pyhv vm trace` shows it,
    and read back from its wire form."""
    e.line()
    assert event_from_wire(e.to_wire()) == e


def vsp_sequence(data: bytes) -> None:
    h = _Host()
    vsp = h.vsp
    vsp.tracer = _record if len(data) % 2 else None  # every packet decoded for the recorder
    r = Reader(data)
    steps = 0
    while r.left and steps < 64:
        steps += 1
        op = r.u8() % 11
        try:
            if op == GUEST:
                vsp.on_packet(Packet(PacketType.DATA_INBAND, 0, r.u32(), r.blob()))
            elif op == RAW:
                vsp.on_packet(Packet(r.u8(), r.u16(), r.u64(), r.blob()))
            elif op == BALLOON:
                vsp.balloon(r.u32())
            elif op == UNBALLOON:
                n = r.u8()
                vsp.unballoon(list(vsp.ballooned)[:n] if n < 128 else [(r.u64(), r.u32())])
            elif op == GOAL:
                vsp.set_goal(r.u32())
            elif op == TICK:
                h.now += r.u16() / 10
                vsp.tick()
            elif op == HOT_ADD:
                vsp.hot_add(PageRange(r.u32(), r.u32()))
            elif op == RESET:
                vsp.reset("the guest rebooted")
            elif op == HOT_REMOVE:
                vsp.hot_remove(r.u32(), bool(r.u8() & 1))
            elif op == ROOM:
                h.room = r.u8()
                vsp.flush()
            elif op == SAVE and not vsp.state.waiting:
                # a migration: the state crosses as JSON-ready data into a fresh VSP
                saved = vsp.save()
                fresh = h.make(RangeSet(vsp.ram))  # hot-added memory goes along
                fresh.restore(DmVspState.from_wire(saved.to_wire()))
                assert fresh.save() == saved, "restore() changed the state"
                fresh.tracer = vsp.tracer
                vsp = h.vsp = fresh
        except VspError:
            pass  # the host asked for what the state does not allow: the host's own error
        # what the VSP holds is always consistent, whatever the guest sent
        for rng in vsp.ballooned:
            assert vsp.ram.contains(*rng), f"ballooned {rng} is not RAM"
        assert vsp.ram.contains(0x100, 6), "a ring the host uses left the guest's RAM"
        assert vsp.outbox_len <= 64, f"{vsp.outbox_len} replies queued"


def _program(*ops: bytes) -> bytes:
    return b"".join(ops)


def _guest(msg: bytes) -> bytes:
    return bytes([GUEST]) + struct.pack("<I", 0) + blob(msg)


def vsp_seeds() -> list[bytes]:
    m = guest_messages()
    hello = _guest(m["version"]) + _guest(m["caps"]) + _guest(m["status"])
    return [
        hello,
        _program(
            hello,
            bytes([BALLOON]) + struct.pack("<I", 64),
            _guest(m["balloon_response"]),
            bytes([SAVE]),
            bytes([UNBALLOON, 1]),
            _guest(m["unballoon_response"]),
        ),
        _program(
            hello,
            bytes([BALLOON]) + struct.pack("<I", 8),
            _guest(m["balloon_response_more"]),
            bytes([TICK]) + struct.pack("<H", 100),
            _guest(m["balloon_response"]),
        ),
        _program(
            hello,
            bytes([HOT_ADD]) + struct.pack("<II", 1 << 16, 512),
            _guest(m["hot_add_response"]),
            bytes([GOAL]) + struct.pack("<I", 70000),
            _guest(m["hot_add_response"]),
            bytes([RESET]),
            hello,
        ),
        _program(
            bytes([ROOM, 0]),
            hello,
            bytes([GOAL]) + struct.pack("<I", 60000),
            _guest(m["balloon_response"]),
            bytes([ROOM, 8]),
            _guest(m["status"]) * 3,
        ),
        _program(
            _guest(m["version"]),
            _guest(m["caps_hot_remove"]),
            bytes([HOT_REMOVE]) + struct.pack("<IB", 2048, 1),
            _guest(m["hot_remove_blocks"]),
            bytes([SAVE]),
            _guest(m["hot_remove_blocks"]),
        ),
        _program(*(_guest(x) for x in m.values())),
    ]


VSP = Target(
    "dynmem.vsp",
    "Dynamic Memory VSP state machine fed message sequences (pyhv.dynmem.vsp)",
    vsp_seeds,
    vsp_sequence,
    (),
    max_size=8192,
    kind="simulation",
)

TARGETS = [PROTOCOL, VSP]
