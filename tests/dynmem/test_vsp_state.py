"""The DM VSP saves its state and restores it in a VSP of another host (live migration): it
goes on in its protocol state with its version, capabilities, balloon and transaction ids; a
state the protocol cannot be restored into, of another version or that does not fit the
partition's RAM is refused, and nothing changes."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.vsp import DmState, DmVspState, DynamicMemoryVsp, GuestCaps
from pyhv.memory.ranges import PageRange, RangeSet

pytestmark = pytest.mark.unit

RAM_PAGES = 65536


def _vsp(sent: list[p.Message] | None = None) -> DynamicMemoryVsp:
    out = sent if sent is not None else []
    return DynamicMemoryVsp(
        RangeSet([(0, RAM_PAGES)]),
        lambda raw: out.append(p.decode(raw)) is None,
        assigned_pages=lambda: RAM_PAGES,
    )


def _guest(vsp: DynamicMemoryVsp, mtype: T, body: object, **kw: object) -> None:
    vsp.on_message(p.encode(mtype, body, **kw), 0)  # type: ignore[arg-type]


def _negotiated_with_a_balloon() -> DynamicMemoryVsp:
    vsp = _vsp()
    _guest(vsp, T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN8))
    _guest(vsp, T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1, hot_add=1, hot_add_alignment=7))
    vsp.balloon(100)
    _guest(vsp, T.BALLOON_RESPONSE, p.DmBalloonResponse(), ranges=[PageRange(0x2000, 100)])
    return vsp


def test_a_vsp_goes_on_in_another_vsp_where_it_was() -> None:
    a = _negotiated_with_a_balloon()
    st = DmVspState.from_wire(a.save().to_wire())
    assert st == a.save()
    sent: list[p.Message] = []
    b = _vsp(sent)
    b.restore(st)
    assert b.state is DmState.IDLE and b.version == p.Version.WIN8
    assert b.caps == GuestCaps(True, True, 128, 0, 0) and list(b.ballooned) == [(0x2000, 100)]
    assert b.counters["accepted"] == a.counters["accepted"]
    b.unballoon([PageRange(0x2000, 100)])  # no new negotiation: it serves the guest at once
    assert sent[-1].type is T.UNBALLOON_REQUEST
    assert sent[-1].trans_id == (st.trans_id + 1) & 0xFFFFFFFF


def test_a_transaction_in_flight_is_not_saved() -> None:
    a = _negotiated_with_a_balloon()
    a.balloon(10)
    with pytest.raises(Exception, match="in flight"):
        a.save()


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"version": 1}, "version 1 is not 2"),
        ({"state": "BALLOON_WAIT"}, "'BALLOON_WAIT' cannot be restored"),
        ({"state": "DANCING"}, "'DANCING' cannot be restored"),
        ({"caps": None}, "do not fit it"),
        ({"state": "VERSION"}, "do not fit it"),
        ({"protocol": 0x00040000}, "is not 0.3..2.0"),
        ({"ballooned": (PageRange(RAM_PAGES - 10, 20),)}, "outside this partition's RAM"),
        ({"ballooned": (PageRange(5, 10), PageRange(10, 10))}, "listed twice"),
        ({"ram": (PageRange(0, 2 * RAM_PAGES),)}, "is not this partition's"),
        ({"trans_id": 1 << 32}, "not 32 bits"),
        ({"caps": GuestCaps(True, True, 1 << 40, 0, 0)}, "not capabilities a guest can report"),
        ({"caps": GuestCaps(True, True, 3, 0, 0)}, "not capabilities a guest can report"),
        ({"caps": GuestCaps(True, True, 2, -1, 0)}, "not capabilities a guest can report"),
    ],
)
def test_a_state_that_does_not_fit_is_refused_and_nothing_changes(
    change: dict[str, object], error: str
) -> None:
    st = replace(_negotiated_with_a_balloon().save(), **change)  # type: ignore[arg-type]
    b = _vsp()
    before = b.save()
    with pytest.raises(ValueError, match=error):
        b.restore(st)
    assert b.save() == before and b.state is DmState.VERSION


def test_a_malformed_state_on_the_wire_is_refused() -> None:
    wire = _negotiated_with_a_balloon().save().to_wire()
    for bad in (
        wire | {"ballooned": [[1]]},
        wire | {"trans_id": "7"},
        wire | {"caps": {"balloon": True}},
        {k: v for k, v in wire.items() if k != "ram"},
    ):
        with pytest.raises(ValueError, match="DM VSP state"):
            DmVspState.from_wire(bad)
