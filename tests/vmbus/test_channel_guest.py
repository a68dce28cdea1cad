"""VMBus channel offers, open and close with the real reference guest: the guest's VMBus client
(guest/vmbus.c) reads the offer the worker's controller makes (pyhv.vmbus.controller), opens the
channel on rings it allocated in its own RAM, and closes it when the host breaks a ring; the
host sees each step."""

from __future__ import annotations

import re

import pytest

from pyhv.dynmem.protocol import DM_GUID
from pyhv.guest_image import image_path
from pyhv.vmbus.channel import ChannelState
from pyhv.vmbus.controller import DEFAULT_PORT
from pyhv.worker import VirtualMachine, VmConfig
from tests.guest.shell import Shell
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

PAGE = 4096
RINGS = re.compile(
    r"rings at ([0-9a-f]+): (\d+) pages, host->guest from page (\d+), vector ([0-9a-f]+)"
)


def test_the_guest_reads_the_offer_opens_the_channel_on_its_rings_and_closes_it() -> None:
    cfg = VmConfig.create(
        image=image_path(), memory="128M", dynamic_memory=True, minimum="64M", maximum="256M"
    )
    with VirtualMachine(cfg) as vm:
        vm.start()
        shell = Shell(vm)
        assert vm.dynmem is not None
        ctl, offer = vm.dynmem.controller, vm.dynmem.offer
        assert str(offer.if_type) == DM_GUID

        # offer: the guest read the record the controller offered, and opened it
        wait_for(lambda: offer.channel is not None, 30, "the host saw the guest's OPEN")
        out = shell.run("vmbus")
        assert f"vmbus: controller at port {DEFAULT_PORT:x}, 1 offers" in out
        assert f"channel {offer.relid}: type {offer.if_type} open" in out

        # open: the host's channel is on the rings the guest allocated and reported
        m = RINGS.search(out)
        assert m, out
        guest_side = (int(m[1], 16), int(m[2]), int(m[3]), int(m[4], 16))
        host_side = (offer.ring_gpa, offer.ring_pages, offer.downstream_pages, offer.vector)
        assert guest_side == host_side
        assert offer.ring_gpa % PAGE == 0 and offer.ring_gpa >= 1 << 20  # the guest's own RAM
        assert offer.ring_pages == 10 and offer.downstream_pages == 5  # 16 KiB a direction
        ch = offer.channel
        assert ch is not None and ch.state is ChannelState.OPEN and ch.relid == offer.relid
        assert ctl.record(offer).flags == 1  # the offer now reads as open
        opened, closed, refused = (ctl.counters[k] for k in ("opened", "closed", "refused"))
        assert (opened, closed, refused) == (1, 0, 0)
        # packets flow on it both ways: the VSP negotiated and hears the guest's reports
        wait_for(lambda: vm.dynmem.negotiated, 30, "the VSP negotiated over the channel")
        wait_for(lambda: vm.dynmem.last_status is not None, 30, "a status report came")
        # the host's ring control page at the GPA the guest gave is the guest's out ring
        write_index = int.from_bytes(vm.partition.read(offer.ring_gpa, 4), "little")
        assert write_index > 0 and write_index % 8 == 0

        # close: the host breaks the host->guest ring; the guest closes with CLOSE
        host_to_guest = vm.partition.view(offer.ring_gpa + offer.downstream_pages * PAGE, 4)
        host_to_guest[:4] = (0xFFF0).to_bytes(4, "little")  # beyond its 16 KiB of data
        wait_for(lambda: offer.channel is None, 30, "the host saw the guest's CLOSE")
        assert ch.state is ChannelState.CLOSED
        assert ch.close_reason == "closed by the guest"  # the controller's CLOSE, not the VSP
        assert (ctl.counters["opened"], ctl.counters["closed"]) == (1, 1)
        assert ctl.record(offer).flags == 0
        out = shell.run("vmbus")
        assert "open" not in out.splitlines()[1]
        assert "closed (the host wrote a bad write_index in the host->guest ring)" in out
