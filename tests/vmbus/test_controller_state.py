"""The VMBus controller saves its registers and open channels and restores them in another
controller over the same guest memory (live migration): the channel goes on over the rings the
guest left, and a state that does not fit the guest's memory or offers is refused, changing
nothing."""

from __future__ import annotations

import mmap
from dataclasses import replace

import pytest

from pyhv.dynmem.protocol import DM_GUID as DM
from pyhv.vmbus.channel import Channel, SavedChannel
from pyhv.vmbus.controller import Command, ControllerState, Reg, VmbusController
from pyhv.vmbus.ring import PAGE_SIZE
from tests.support.guest_ring import GuestRing

pytestmark = pytest.mark.unit

RAM = 1 << 20


class Guest:
    """Guest RAM and the guest's writes to the controller's registers."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, RAM)
        self.ram = memoryview(self.mm)
        self.opened: list[Channel] = []
        self.ctl = VmbusController(self.view, lambda v: lambda: None)
        self.ctl.offer(DM, self.opened.append)

    def view(self, gpa: int, size: int) -> memoryview:
        if gpa < 0 or gpa + size > RAM:
            raise ValueError(f"{gpa:#x}+{size:#x} is not RAM")
        return self.ram[gpa : gpa + size]

    def open(self, gpa: int = 0x10000, pages: int = 8, split: int = 4, vector: int = 0x40) -> None:
        for r, v in [
            (Reg.SELECT, 0),
            (Reg.RING_GPA_LO, gpa & 0xFFFFFFFF),
            (Reg.RING_GPA_HI, gpa >> 32),
            (Reg.RING_PAGES, pages),
            (Reg.DOWNSTREAM_PAGES, split),
            (Reg.VECTOR, vector),
            (Reg.COMMAND, Command.OPEN),
        ]:
            self.ctl.io_write(r, v)


def _twin(g: Guest) -> tuple[VmbusController, list[Channel]]:
    """A second controller with the same offer over the same guest memory (the destination)."""
    opened: list[Channel] = []
    ctl = VmbusController(g.view, lambda v: lambda: None)
    ctl.offer(DM, opened.append)
    return ctl, opened


def test_an_open_channel_goes_on_over_the_same_rings_in_another_controller() -> None:
    g = Guest()
    g.open(gpa=0x10000, pages=8, split=4, vector=0x41)
    out = GuestRing(g.ram[0x10000 : 0x10000 + 4 * PAGE_SIZE])
    out.write(b"sent before the move", 5)  # not read by the source host
    st = ControllerState.from_wire(g.ctl.save().to_wire())
    assert st.channels == (SavedChannel(1, 0x10000, 8, 4, 0x41),)
    ctl, opened = _twin(g)
    ctl.restore(st)
    (ch,) = opened
    got: list[bytes] = []
    ch.on_packet = lambda p: got.append(p.payload)
    ctl.doorbell(1)
    assert len(got) == 1 and got[0].rstrip(b"\0") == b"sent before the move"
    assert ctl.save() == replace(st, counters=ctl.save().counters)
    assert ctl.counters["opened"] == 1  # the guest opened it once: the counters go on


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"ring_gpa": RAM - 4 * PAGE_SIZE}, "outside this guest's RAM"),
        ({"ring_gpa": 1 << 40}, "outside this guest's RAM"),
        ({"relid": 2}, "no such offer"),
        ({"downstream_pages": 7}, "not a ring a guest can open"),
        ({"vector": 3}, "not a ring a guest can open"),
    ],
)
def test_a_channel_that_does_not_fit_is_refused_and_nothing_changes(
    change: dict[str, int], error: str
) -> None:
    g = Guest()
    g.open()
    st = g.ctl.save()
    bad = replace(st, channels=(replace(st.channels[0], **change),))
    ctl, opened = _twin(g)
    before = ctl.save()
    with pytest.raises(ValueError, match=error):
        ctl.restore(bad)
    assert opened == [] and ctl.offers[0].channel is None and ctl.save() == before


def test_a_controller_state_of_another_version_or_register_is_refused() -> None:
    g = Guest()
    ctl, _ = _twin(g)
    before = ctl.save()
    for bad, error in (
        (replace(before, version=2), "version 2 is not 1"),
        (replace(before, cursor=17), "cursor 17"),
        (replace(before, status=99), "status 99"),
        (replace(before, counters={"opened": -1}), "are negative"),
    ):
        with pytest.raises(ValueError, match=error):
            ctl.restore(bad)
    with pytest.raises(
        ValueError, match=r"VMBus controller state: Expected `int`, got `str` - at `\$.select`"
    ):
        ControllerState.from_wire(before.to_wire() | {"select": "0"})
    assert ctl.save() == before


def test_a_channel_open_here_already_is_not_opened_twice() -> None:
    g = Guest()
    g.open()
    with pytest.raises(ValueError, match="open here already"):
        g.ctl.restore(g.ctl.save())
    assert len(g.opened) == 1


def test_a_restored_offer_records_its_channel_s_ring_not_the_registers() -> None:
    g = Guest()
    g.open(gpa=0x10000, pages=8, split=4, vector=0x41)
    st = replace(g.ctl.save(), ring_gpa=1 << 40, ring_pages=9999, downstream_pages=1, vector=7)
    ctl, _ = _twin(g)
    ctl.restore(st)
    o = ctl.offers[0]
    assert (o.ring_gpa, o.ring_pages, o.downstream_pages, o.vector) == (0x10000, 8, 4, 0x41)
