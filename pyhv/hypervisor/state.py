"""Saving a partition's whole state and restoring it into a fresh partition (any process).

The state is plain data (bytes and ints in dataclasses): pickle it, send it, restore it. The VPs
must be paused or stopped while it is taken. Restore order is the one that worked on this
machine's KVM (reference/kvm-here.md): SREGS, REGS, XSAVE, XCRS, MSRs, VCPU_EVENTS, MP_STATE,
LAPIC, DEBUGREGS per VP, then the three IRQCHIPs and the clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyhv.kvm import KvmError, Vcpu
from pyhv.kvm import structs as ks

if TYPE_CHECKING:
    from pyhv.hypervisor.partition import Partition

STATE_VERSION = 1


@dataclass
class VpSavedState:
    index: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    msrs: dict[int, int]
    events: bytes
    mp_state: int
    lapic: bytes
    debugregs: bytes


@dataclass
class RegionSavedState:
    gpa: int
    size: int
    readonly: bool
    track_dirty: bool
    data: bytes = field(repr=False)


@dataclass
class PartitionState:
    version: int
    name: str
    irqchip: bool
    regions: list[RegionSavedState]
    vps: list[VpSavedState]
    irqchips: list[bytes]
    clock: bytes | None


class StateError(RuntimeError):
    """The state cannot be taken or restored as asked."""


def _readable_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """KVM_GET_MSRS stops at the first MSR it cannot read: skip that one and go on."""
    out: dict[int, int] = {}
    rest = indices
    while rest:
        got = vcpu.get_msrs(rest)
        out.update(got)
        rest = rest[len(got) + 1 :]
    return out


def save_vp(vcpu: Vcpu, msr_indices: list[int]) -> VpSavedState:
    return VpSavedState(
        index=vcpu.index,
        regs=bytes(vcpu.get_regs()),
        sregs=bytes(vcpu.get_sregs()),
        xsave=vcpu.get_xsave(),
        xcrs=bytes(vcpu.get_xcrs()),
        msrs=_readable_msrs(vcpu, msr_indices),
        events=bytes(vcpu.get_vcpu_events()),
        mp_state=vcpu.get_mp_state(),
        lapic=bytes(vcpu.get_lapic()),
        debugregs=bytes(vcpu.get_debugregs()),
    )


def restore_vp(vcpu: Vcpu, st: VpSavedState) -> None:
    vcpu.set_sregs(ks.kvm_sregs.from_buffer_copy(st.sregs))
    vcpu.set_regs(ks.kvm_regs.from_buffer_copy(st.regs))
    vcpu.set_xsave(st.xsave)
    vcpu.set_xcrs(ks.kvm_xcrs.from_buffer_copy(st.xcrs))
    items = sorted(st.msrs.items())
    while items:  # KVM stops at the first MSR it refuses: skip it and go on
        n = vcpu.set_msrs(items)
        items = items[n + 1 :]
    vcpu.set_vcpu_events(ks.kvm_vcpu_events.from_buffer_copy(st.events))
    vcpu.set_mp_state(st.mp_state)
    vcpu.set_lapic(ks.kvm_lapic_state.from_buffer_copy(st.lapic))
    vcpu.set_debugregs(ks.kvm_debugregs.from_buffer_copy(st.debugregs))


def save_partition(p: Partition) -> PartitionState:
    running = [vp.index for vp in p.vps.values() if vp.state.value == "running"]
    if running:
        raise StateError(f"VPs {running} are running: pause() them before saving the state")
    msr_indices = p.kvm.msr_index_list()
    vps = [save_vp(vp.vcpu, msr_indices) for vp in sorted(p.vps.values(), key=lambda v: v.index)]
    regions = [
        RegionSavedState(r.gpa, r.size, r.readonly, r.track_dirty, bytes(r.mm)) for r in p.regions
    ]
    irqchips = [bytes(p.vm.get_irqchip(i)) for i in range(3)] if p.irqchip else []
    try:
        clock: bytes | None = bytes(p.vm.get_clock())
    except KvmError:
        clock = None
    return PartitionState(STATE_VERSION, p.name, p.irqchip, regions, vps, irqchips, clock)


def check_restorable(st: PartitionState) -> None:
    """Refuse a state this code cannot restore, before anything is created."""
    if st.version != STATE_VERSION:
        raise StateError(f"state version {st.version} is not {STATE_VERSION}: cannot restore it")


def restore_into(p: Partition, st: PartitionState) -> None:
    """Fill `p`, a fresh partition made for `st` (Partition.restore makes it), with `st`.
    The partition's class is not imported here: it imports this module."""
    check_restorable(st)
    for r in st.regions:
        if len(r.data) != r.size:
            raise StateError(f"region {r.gpa:#x} holds {len(r.data)} bytes, not {r.size}")
        region = p.add_memory(r.gpa, r.size, readonly=r.readonly, track_dirty=r.track_dirty)
        region.mm[:] = r.data
    for v in st.vps:
        vp = p.create_vp(v.index)
        restore_vp(vp.vcpu, v)
    for chip in st.irqchips:
        p.vm.set_irqchip(ks.kvm_irqchip.from_buffer_copy(chip))
    if st.clock is not None:
        cd = ks.kvm_clock_data.from_buffer_copy(st.clock)
        cd.flags = 0  # only `clock` is set; the other fields are informational
        p.vm.set_clock(cd)


__all__ = [
    "PartitionState",
    "RegionSavedState",
    "StateError",
    "VpSavedState",
    "check_restorable",
    "restore_into",
    "save_partition",
]
