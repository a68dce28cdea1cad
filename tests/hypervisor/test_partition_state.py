"""A partition's state restored into a partition built the same way (live migration, memory sent
apart): the VPs' registers arrive; a state whose RAM lies outside the partition, whose VPs it
lacks, whose KVM structures have the wrong size or whose version is unknown is refused, and
nothing changes. No guest code runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from pyhv.hypervisor import Partition, StateError
from pyhv.hypervisor.state import PartitionState, RegionSavedState

pytestmark = pytest.mark.kvm

RAM = 2 << 20


def _partition(regions: tuple[tuple[int, int], ...] = ((0, RAM),), vps: int = 1) -> Partition:
    p = Partition("vm")
    for gpa, size in regions:
        p.add_memory(gpa, size)
    for _ in range(vps):
        p.create_vp()
    return p


def _fingerprint(p: Partition) -> tuple[object, ...]:
    """What a refused restore would have changed (not the clock, TSC or timers, which run)."""
    st = p.save(memory=True)
    vps = [(v.regs, v.sregs, v.xcrs, v.debugregs, v.mp_state) for v in st.vps]
    return (vps, st.regions, st.intercept_counters)


@pytest.fixture
def made() -> Iterator[list[Partition]]:
    out: list[Partition] = []
    yield out
    for p in out:
        p.close()


def _saved(made: list[Partition]) -> PartitionState:
    src = _partition()
    made.append(src)
    regs = src.vps[0].registers
    regs.rbx, regs.rip = 0x1234_5678, 0x7000
    src.vps[0].registers = regs
    src.vps[0].counts[1] += 5
    return src.save()


def test_a_partition_state_goes_on_in_a_partition_built_the_same_way(
    made: list[Partition],
) -> None:
    st = PartitionState.from_wire(_saved(made).to_wire())
    dst = _partition()
    made.append(dst)
    dst.restore(st)
    regs = dst.vps[0].registers
    assert (regs.rbx, regs.rip) == (0x1234_5678, 0x7000)
    assert dst.vps[0].counts[1] == 5  # the intercept counters go on from the source's
    assert dst.save().vps[0].regs == st.vps[0].regs


@pytest.mark.parametrize(
    ("build", "change", "error"),
    [
        ({}, {"version": 1}, "version 1 is not 2"),
        ({"regions": ((0, RAM // 2),)}, {}, r"RAM 0x0\+0x200000 is not a region"),
        ({"regions": ((0, RAM), (RAM, RAM))}, {}, "RAM the state does not"),
        ({"vps": 2}, {}, r"VPs \[0\], the partition \[0, 1\]"),
        ({}, {"irqchips": ()}, "0 IRQCHIPs"),
        ({}, {"clock": b"\x00" * 3}, "the clock is 3 bytes"),
        ({}, {"regions": (RegionSavedState(0, RAM, False, False, b"x"),)}, "holds 1 bytes"),
        ({}, {"intercept_counters": {7: {}}}, "VP 7, which"),
        # found by the fuzz campaign (tests/fuzz): a KeyError, not a StateError
        (
            {},
            {"intercept_counters": {0: {"counts": [1]}}},
            r"VP 0: intercept counters \['counts'\]",
        ),
    ],
)
def test_a_state_that_does_not_fit_the_partition_is_refused_and_nothing_changes(
    made: list[Partition], build: dict[str, object], change: dict[str, object], error: str
) -> None:
    st = replace(_saved(made), **change)  # type: ignore[arg-type]
    dst = _partition(**build)  # type: ignore[arg-type]
    made.append(dst)
    before = _fingerprint(dst)
    with pytest.raises(StateError, match=error):
        dst.restore(st)
    assert _fingerprint(dst) == before


def test_a_vp_structure_of_the_wrong_size_is_refused_before_any_vp_changes(
    made: list[Partition],
) -> None:
    st = _saved(made)
    bad_vp = replace(st.vps[0], lapic=st.vps[0].lapic[:-1])
    dst = _partition()
    made.append(dst)
    before = _fingerprint(dst)
    with pytest.raises(StateError, match="VP 0 lapic is 1023 bytes, not the 1024"):
        dst.restore(replace(st, vps=(bad_vp,)))
    assert _fingerprint(dst) == before
    with pytest.raises(StateError, match="malformed"):
        PartitionState.from_wire(st.to_wire() | {"vps": [{"index": 0}]})
