"""Demand after ballooning: the guest's num_committed counts its own balloon (the balloon's pages
are allocated inside the guest, so they are committed); the host subtracts the pages it holds
ballooned, so a ballooned VM at rest does not look short of what it just gave back."""

from __future__ import annotations

import re

import pytest

from pyhv.dynmem import protocol as p
from pyhv.dynmem.balancer import Add, HostMemory, MemorySettings, VmMemoryState, decide
from pyhv.dynmem.protocol import MessageType as T
from pyhv.dynmem.status import MemoryStatus
from pyhv.dynmem.vsp import DynamicMemoryVsp
from pyhv.memory.ranges import PageRange, RangeSet
from tests.support.floor import floor_pages
from tests.support.wait import wait_for

pytestmark = pytest.mark.simulation

MIB = 256  # pages
RAM = 256 * MIB


class Vm:
    """A 256 MiB guest's VSP; assigned = visible - ballooned, as the worker has it."""

    def __init__(self) -> None:
        self.reports: list[MemoryStatus] = []
        self.vsp = DynamicMemoryVsp(
            RangeSet([(0, RAM)]),
            lambda raw: True,
            assigned_pages=lambda: RAM - self.vsp.ballooned.pages,
            on_status=self.reports.append,
        )
        self.guest(T.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10))
        self.guest(T.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1, hot_add=1))

    def guest(self, mtype: T, body: object, **kw: object) -> None:
        self.vsp.on_message(p.encode(mtype, body, **kw) + bytes(4), 0)  # type: ignore[arg-type]

    def balloon_128_mib(self) -> None:
        """The host asks for 128 MiB and the guest gives pages [128 MiB, 256 MiB) at once."""
        self.vsp.balloon(128 * MIB)
        self.guest(
            T.BALLOON_RESPONSE,
            p.DmBalloonResponse(more_pages=0),
            ranges=[PageRange(128 * MIB, 128 * MIB)],
        )

    def report(self, committed: int) -> MemoryStatus:
        """A status report as Linux's hv_balloon (and the reference guest) computes it."""
        ballooned = self.vsp.ballooned.pages
        num_committed = committed + ballooned + floor_pages(RAM - ballooned)
        self.guest(T.STATUS_REPORT, p.DmStatus(num_avail=0, num_committed=num_committed))
        return self.reports[-1]


def test_the_demand_of_a_ballooned_vm_leaves_out_the_pages_the_host_holds_ballooned() -> None:
    vm = Vm()
    before = vm.report(20 * MIB)
    vm.balloon_128_mib()
    after = vm.report(20 * MIB)
    assert after.ballooned_pages == 128 * MIB
    assert after.guest_committed_pages == 20 * MIB + 128 * MIB + floor_pages(128 * MIB)
    # Only the floor moved (it follows the guest's RAM), not the balloon.
    assert after.committed_pages == before.committed_pages - 32 * MIB
    assert after.pressure is not None and after.pressure < 100


def test_a_ballooned_vm_at_rest_is_not_given_its_memory_straight_back() -> None:
    vm = Vm()
    vm.balloon_128_mib()
    report = vm.report(20 * MIB)
    settings = MemorySettings.from_mib(startup=256, minimum=128, maximum=1024)
    state = VmMemoryState("vm", settings, RAM, RAM - 128 * MIB, 128 * MIB, report)
    decision = decide(HostMemory(free_pages=4096 * MIB), [state])
    assert not any(isinstance(op, Add) for op in decision.operations)
    assert decision.pressure[0] < 100


@pytest.mark.guest
def test_a_ballooned_reference_guest_counts_its_balloon_and_the_host_leaves_it_out() -> None:
    """The real guest (guest/dmvsc.c, as Linux's hv_balloon) counts its balloon in num_committed;
    the host's demand is that less the pages it holds ballooned, and pressure is demand over
    assigned."""
    from pyhv.guest_image import image_path
    from pyhv.worker import VirtualMachine, VmConfig
    from tests.guest.shell import Shell

    cfg = VmConfig.create(
        image=image_path(), dynamic_memory=True, startup="256M", minimum="64M", maximum="256M"
    )
    with VirtualMachine(cfg) as vm:
        vm.start()
        shell = Shell(vm)
        svc = vm.dynmem
        assert svc is not None
        # the guest's DM driver starts after its shell
        wait_for(lambda: svc.negotiated, 30, "the guest's DM driver negotiating")
        vm.set_memory_target(192 << 20)
        assert vm.wait_memory_idle(60)
        assert vm.memory_status()["ballooned_pages"] == 64 * MIB

        def agreed() -> MemoryStatus | None:
            """A host report after the balloon whose num_committed the guest says it sent."""
            s = svc.last_status
            sent = re.search(r"^last-committed: (\d+)$", shell.run("dm"), re.M)
            if s is None or s.ballooned_pages != 64 * MIB or sent is None:
                return None
            return s if s.guest_committed_pages == int(sent[1]) else None

        s = wait_for(agreed, 30, "a status report after the balloon", interval=0.1)
        assert s.guest_committed_pages is not None
        assert s.guest_committed_pages > 64 * MIB  # the balloon is in what the guest sent
        assert s.committed_pages == s.guest_committed_pages - 64 * MIB
        assert s.pressure == s.committed_pages * 100 / (192 * MIB)
