"""The VMMS's balancer loop against fake workers: their status in, memory targets out, the host
pool and the counters following what the workers carried out."""

from __future__ import annotations

from typing import Any

import pytest

from pyhv.counters.dynmem import DynamicMemoryCounters
from pyhv.counters.registry import CounterRegistry
from pyhv.dynmem.balancer import PAGE_SIZE, Add, MemorySettings, Remove
from pyhv.vmms.balancing import BalancerLoop
from pyhv.vmms.pool import HostPool
from tests.vmms.fakes import MIB, FakeStatusWorker

pytestmark = pytest.mark.simulation


def _loop(vms: dict[str, tuple[MemorySettings, Any]], budget_mib: int = 8192):
    pool = HostPool(budget_mib << 20)
    for name, (settings, w) in vms.items():
        pool.admit(name, settings.startup_pages * PAGE_SIZE)
        w.attach(pool, name)
    registry = CounterRegistry()
    counters = DynamicMemoryCounters(registry)
    return BalancerLoop(pool, lambda: vms, counters), pool, registry


SETTINGS = MemorySettings.from_mib(startup=512, minimum=256, maximum=4096)


def test_a_spike_leads_to_an_add_dispatched_to_the_worker_within_one_tick() -> None:
    w = FakeStatusWorker(512 * MIB, committed=427 * MIB)
    loop, pool, _ = _loop({"testvm": (SETTINGS, w)})
    d = loop.tick()
    assert d is not None and d.operations == () and w.targets == []
    w.committed = 1427 * MIB  # testlimit commits 1000 MiB
    d = loop.tick()
    assert d is not None
    (op,) = d.operations
    assert isinstance(op, Add) and op.vm == "testvm"
    assert w.targets == [512 * MIB + op.pages]
    assert w.targets[0] >= 1427 * MIB * 1.2  # demand plus the 20 % buffer


def test_an_operation_in_flight_is_not_decided_again() -> None:
    w = FakeStatusWorker(512 * MIB, committed=1427 * MIB)
    loop, pool, _ = _loop({"testvm": (SETTINGS, w)})
    loop.tick()
    free_after_first = pool.free_pages
    loop.tick()  # the worker has not carried it out yet
    assert len(w.targets) == 1
    assert pool.free_pages == free_after_first  # the pool follows the worker, not the plan


def test_what_the_worker_carried_out_is_counted_and_taken_from_the_pool() -> None:
    w = FakeStatusWorker(512 * MIB, committed=1427 * MIB)
    loop, pool, registry = _loop({"testvm": (SETTINGS, w)})
    free = pool.free_pages
    loop.tick()
    w.carry_out()
    loop.tick()
    added = w.targets[0] - 512 * MIB
    assert pool.free_pages == free - added
    assert pool.pages("testvm") == (w.targets[0], w.targets[0], 0)
    snap = registry.snapshot()
    vm = r"\Hyper-V Dynamic Memory VM(testvm)"
    assert snap[vm + r"\Memory Add Operations"] == 1
    assert snap[vm + r"\Added Memory"] == added / MIB
    assert snap[vm + r"\Physical Memory"] == w.targets[0] / MIB


def test_a_remove_balloons_lazily_and_returns_pages_to_the_pool() -> None:
    w = FakeStatusWorker(2048 * MIB, committed=427 * MIB)
    loop, pool, registry = _loop({"testvm": (SETTINGS, w)})
    loop.config = type(loop.config)(remove_delay_s=3.0)
    assert loop.tick().operations == ()  # type: ignore[union-attr]
    free = pool.free_pages  # after the first tick took in the 2 GiB the VM holds
    assert loop.tick().operations == ()  # type: ignore[union-attr]
    (op,) = loop.tick().operations  # type: ignore[union-attr]
    assert isinstance(op, Remove)
    w.carry_out()
    loop.tick()
    assert pool.free_pages == free + op.pages
    assert pool.pages("testvm")[2] == op.pages  # ballooned
    assert registry.snapshot()[r"\Hyper-V Dynamic Memory VM(testvm)\Memory Remove Operations"] == 1


def test_a_vm_whose_guest_has_not_reported_is_left_alone() -> None:
    quiet = FakeStatusWorker(512 * MIB, committed=None)
    loop, pool, registry = _loop({"quiet": (SETTINGS, quiet)})
    assert loop.tick() is None
    assert quiet.targets == []
    # The pool is still shown: free memory less the reserve.
    assert registry.snapshot()[r"\Hyper-V Dynamic Memory Balancer\Available Memory"] == (
        pool.free_pages / MIB
    )


def test_a_worker_without_dynamic_memory_is_skipped_and_the_others_balanced() -> None:
    class Silent(FakeStatusWorker):
        def push(self) -> None:
            pass  # no DM channel: nothing is ever pushed

    a, b = FakeStatusWorker(512 * MIB, 1427 * MIB), Silent(512 * MIB, 0)
    loop, _, _ = _loop({"a": (SETTINGS, a), "b": (SETTINGS, b)})
    d = loop.tick()
    assert d is not None and d.vm_ids == ("a",) and len(a.targets) == 1


def test_an_administrators_target_goes_to_the_worker_and_is_counted_when_done() -> None:
    w = FakeStatusWorker(512 * MIB, committed=100 * MIB)
    loop, pool, registry = _loop({"testvm": (SETTINGS, w)})
    loop.request_target("testvm", w, 768 * MIB)
    assert w.targets == [768 * MIB]
    w.carry_out()
    loop.tick()
    assert pool.pages("testvm")[1] == 768 * MIB
    assert registry.snapshot()[r"\Hyper-V Dynamic Memory VM(testvm)\Added Memory"] == 256


def test_a_pool_follows_the_workers_pushed_statuses_with_no_mirror() -> None:
    w = FakeStatusWorker(512 * MIB, committed=100 * MIB)
    loop, pool, _ = _loop({"testvm": (SETTINGS, w)})
    budget = pool.budget_pages
    w.visible, w.assigned = 1024 * MIB, 768 * MIB  # hot-added 512 MiB, ballooned 256 MiB
    w.push()
    assert pool.pages("testvm") == (1024 * MIB, 768 * MIB, 256 * MIB)
    assert pool.free_pages == budget - 768 * MIB
    assert pool.give_back("testvm") == 768 * MIB and pool.free_pages == budget


class EagerWorker(FakeStatusWorker):
    """Carries out every target at once (a hot-add that completes before any balloon)."""

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        super().set_memory_target(target_bytes)
        self.carry_out()
        return {}


def test_an_add_is_paid_only_by_a_removal_once_the_guest_has_given_the_pages() -> None:
    # B (50) needs more, the host is full, C (20) holds a surplus: the balancer takes C's
    # surplus at once, and B's add must wait for C's balloon, which is slow (and here first
    # fails: C's guest is at its floor), while B's hot-add would complete at once.
    settings = {
        "B": MemorySettings.from_mib(startup=1024, minimum=256, maximum=2048, weight=50),
        "C": MemorySettings.from_mib(startup=1024, minimum=256, maximum=2048, weight=20),
    }
    b, c = EagerWorker(1024 * MIB, 1500 * MIB), FakeStatusWorker(1024 * MIB, 300 * MIB)
    loop, pool, _ = _loop({"B": (settings["B"], b), "C": (settings["C"], c)}, budget_mib=2048)
    budget = pool.budget_pages - pool.reserve_pages

    d = loop.tick()
    assert d is not None and d.host_short and c.targets and c.targets[-1] < 1024 * MIB
    assert b.targets == []  # nothing free this tick: the reclaim pays for nothing yet
    for _ in range(3):  # C's balloon has not come back: B's add is decided, and waits
        d = loop.tick()
        assert d is not None and any(isinstance(op, Add) for op in d.operations)
        assert b.targets == [] and pool.peak_assigned_pages <= budget
    c.busy = False
    c.push()  # C's guest gave nothing (at its floor): the removal ends short
    loop.tick()
    assert b.targets == [] and pool.peak_assigned_pages <= budget
    c.carry_out()  # now the guest balloons: the pages are free, and B's add is paid from them
    loop.tick()
    assert b.targets and b.assigned > 1024 * MIB
    assert pool.peak_assigned_pages <= budget


class _AtItsFloor(FakeStatusWorker):
    """A worker whose guest balloons no further than `floor` pages (Linux's balloon floor)."""

    floor = 900 * MIB

    def carry_out(self) -> None:
        self.targets[-1] = max(self.targets[-1], min(self.floor, self.assigned))
        super().carry_out()


def test_a_guest_at_its_floor_is_asked_once_until_its_status_changes() -> None:
    w = _AtItsFloor(2048 * MIB, committed=100 * MIB)
    loop, pool, _ = _loop({"testvm": (SETTINGS, w)})
    loop.config = type(loop.config)(remove_delay_s=0.0, remove_step_pages=2048 * MIB)
    loop.tick()
    assert w.targets == [256 * MIB]  # trimmed towards its minimum, in one step
    w.carry_out()  # the guest stops at its floor
    for _ in range(20):  # the same status every second: nothing asked
        loop.tick()
        w.push()
    assert len(w.targets) == 1 and w.assigned == 900 * MIB
    # the guest's demand moves (a workload ends): asked once more, and remembered again
    w.committed = 60 * MIB
    loop.tick()
    assert len(w.targets) == 2
    w.carry_out()
    for _ in range(20):
        loop.tick()
    assert len(w.targets) == 2
    # its floor never stops it from getting memory when it needs some
    w.committed = 1427 * MIB
    loop.tick()
    assert len(w.targets) == 3 and w.targets[-1] >= 1427 * MIB * 1.2


def test_a_guest_at_its_floor_is_not_asked_again_when_the_host_is_short() -> None:
    big = FakeStatusWorker(512 * MIB, committed=427 * MIB)
    low = _AtItsFloor(2048 * MIB, committed=100 * MIB)
    low.floor = 1900 * MIB
    high = MemorySettings.from_mib(startup=512, minimum=256, maximum=4096, weight=80)
    lowest = MemorySettings.from_mib(startup=2048, minimum=256, maximum=4096, weight=20)
    loop, pool, _ = _loop({"big": (high, big), "low": (lowest, low)}, budget_mib=2560)
    loop.tick()
    big.committed = 1427 * MIB  # the host cannot give it all: the low-weight VM is asked
    loop.tick()
    assert low.targets and low.targets[-1] < 1900 * MIB
    low.carry_out()  # it stops at its floor
    asked = len(low.targets)
    for _ in range(20):
        loop.tick()
        big.carry_out() if big.busy else big.push()
        low.push()
    assert len(low.targets) == asked
