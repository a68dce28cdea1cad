"""Saving a partition's state and restoring it: into a fresh partition in any process (a
snapshot, with memory), or into a partition built with the same RAM and VPs (live migration,
memory sent apart).

The state is a versioned :class:`PartitionState` of plain data (bytes and ints in frozen
dataclasses), with `to_wire()`/`from_wire()` for a JSON stream. The VPs must be paused or stopped
while it is taken. `restore` checks the state against the partition it goes into (the RAM
regions, the VPs, the size of every KVM structure, the version) before it changes anything: a
state that does not fit raises StateError naming the value. Restore order is the one that worked
on this machine's KVM (reference/kvm-here.md): SREGS, REGS, XSAVE, XCRS, MSRs, VCPU_EVENTS,
MP_STATE, LAPIC, DEBUGREGS per VP, then the three IRQCHIPs and the clock.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyhv import wire
from pyhv.kvm import KvmError, Vcpu
from pyhv.kvm import structs as ks

if TYPE_CHECKING:
    from pyhv.hypervisor.partition import Partition

STATE_VERSION = 2
#: The per-VP intercept counters (arrays indexed by intercept kind) a state carries.
COUNTER_NAMES = ("counts", "defaults", "errors", "handler_ns")
#: The binary fields of a VP's state and the KVM structure each must be.
_VP_STRUCTS = {
    "regs": ks.kvm_regs,
    "sregs": ks.kvm_sregs,
    "xsave": ks.kvm_xsave,
    "xcrs": ks.kvm_xcrs,
    "events": ks.kvm_vcpu_events,
    "lapic": ks.kvm_lapic_state,
    "debugregs": ks.kvm_debugregs,
}


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class RegionSavedState:
    gpa: int
    size: int
    readonly: bool
    track_dirty: bool
    #: The contents (a snapshot), or None (live migration sends memory apart).
    data: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PartitionState:
    version: int
    name: str
    irqchip: bool
    regions: tuple[RegionSavedState, ...]
    vps: tuple[VpSavedState, ...]
    irqchips: tuple[bytes, ...]
    clock: bytes | None
    #: VP index -> {counter name: per-kind totals}: the intercept counters go on from these.
    intercept_counters: dict[int, dict[str, list[int]]] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        return wire.to_wire(self)

    @classmethod
    def from_wire(cls, d: Any) -> PartitionState:
        """The shape (StateError if it is not one); `restore` checks the values."""
        try:
            return wire.from_wire(cls, d, "the partition state is malformed")
        except ValueError as e:
            raise StateError(str(e)) from None


class StateError(ValueError):
    """The state cannot be taken or restored as asked; nothing was changed."""


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


def save_partition(p: Partition, *, memory: bool = False) -> PartitionState:
    """The partition's state; with `memory`, the contents of its RAM too (a snapshot)."""
    running = [vp.index for vp in p.vps.values() if vp.state.value == "running"]
    if running:
        raise StateError(f"VPs {running} are running: pause() them before saving the state")
    msr_indices = p.kvm.msr_index_list()
    vps = tuple(
        save_vp(vp.vcpu, msr_indices) for vp in sorted(p.vps.values(), key=lambda v: v.index)
    )
    regions = tuple(
        RegionSavedState(r.gpa, r.size, r.readonly, r.track_dirty, bytes(r.mm) if memory else None)
        for r in p.regions
    )
    irqchips = tuple(bytes(p.vm.get_irqchip(i)) for i in range(3)) if p.irqchip else ()
    try:
        clock: bytes | None = bytes(p.vm.get_clock())
    except KvmError:
        clock = None
    counters = {
        i: {n: list(getattr(vp, n)) for n in COUNTER_NAMES} for i, vp in sorted(p.vps.items())
    }
    return PartitionState(STATE_VERSION, p.name, p.irqchip, regions, vps, irqchips, clock, counters)


def _check_size(what: str, data: bytes, struct: type[ctypes.Structure]) -> None:
    if len(data) != ctypes.sizeof(struct):
        raise StateError(
            f"{what} is {len(data)} bytes, not the {ctypes.sizeof(struct)} of {struct.__name__}"
        )


def check(p: Partition, st: PartitionState) -> None:
    """Whether `st` fits partition `p`; StateError naming the value if not."""
    if st.version != STATE_VERSION:
        raise StateError(
            f"partition state version {st.version!r} is not {STATE_VERSION}: the hosts run "
            "different pyhv releases"
        )
    have = {(r.gpa, r.size, r.readonly) for r in p.regions}
    for r in st.regions:
        if (r.gpa, r.size, r.readonly) not in have:
            raise StateError(
                f"the state's RAM {r.gpa:#x}+{r.size:#x}{' (read-only)' if r.readonly else ''} "
                f"is not a region of partition {p.name!r} "
                f"({sorted((hex(g), hex(n)) for g, n, _ in have)}): build it with the same RAM"
            )
        if r.data is not None and len(r.data) != r.size:
            raise StateError(f"region {r.gpa:#x} holds {len(r.data)} bytes, not {r.size}")
    missing = have - {(r.gpa, r.size, r.readonly) for r in st.regions}
    if missing:
        raise StateError(
            f"partition {p.name!r} has RAM the state does not: "
            f"{sorted((hex(g), hex(n)) for g, n, _ in missing)}"
        )
    mine = sorted(p.vps)
    if sorted(v.index for v in st.vps) != mine:
        raise StateError(f"the state has VPs {[v.index for v in st.vps]}, the partition {mine}")
    running = [vp.index for vp in p.vps.values() if vp.state.value == "running"]
    if running:
        raise StateError(f"VPs {running} are running: pause() them before restoring a state")
    for v in st.vps:
        for name, struct in _VP_STRUCTS.items():
            _check_size(f"VP {v.index} {name}", getattr(v, name), struct)
        bad = [i for i, x in v.msrs.items() if not (0 <= i <= 0xFFFFFFFF and 0 <= x < 1 << 64)]
        if bad:
            raise StateError(f"VP {v.index}: MSRs {[hex(i) for i in bad]} are out of range")
        if not 0 <= v.mp_state <= 0xFF:
            raise StateError(f"VP {v.index}: MP state {v.mp_state} is no KVM_MP_STATE")
    if len(st.irqchips) != (3 if p.irqchip else 0):
        raise StateError(
            f"the state has {len(st.irqchips)} IRQCHIPs; partition {p.name!r} "
            f"{'has 3' if p.irqchip else 'has none'}"
        )
    for i, chip in enumerate(st.irqchips):
        _check_size(f"IRQCHIP {i}", chip, ks.kvm_irqchip)
    if st.clock is not None:
        _check_size("the clock", st.clock, ks.kvm_clock_data)
    for i, c in st.intercept_counters.items():
        if i not in p.vps:
            raise StateError(f"intercept counters of VP {i}, which partition {p.name!r} lacks")
        if sorted(c) != sorted(COUNTER_NAMES):
            raise StateError(
                f"VP {i}: intercept counters {sorted(c)} are not {list(COUNTER_NAMES)}"
            )
        for n in COUNTER_NAMES:
            if len(c[n]) > len(getattr(p.vps[i], n)) or any(x < 0 for x in c[n]):
                raise StateError(f"VP {i}: intercept counters {n}={c[n]} do not fit")


def restore_into(p: Partition, st: PartitionState, *, checked: bool = False) -> None:
    """Take `st` into partition `p` (same RAM regions and VPs, VPs not running): memory if the
    state has it, VPs first, then IRQCHIPs and the clock; the intercept counters go on from
    the state's totals. Checked first: nothing changes if it does not fit (`checked`: the
    caller has just run check(p, st) itself, as a migration does for every component before
    it restores any: not twice inside the pause, ~0.04 ms)."""
    if not checked:
        check(p, st)
    regions = {r.gpa: r for r in p.regions}
    for r in st.regions:
        if r.data is not None:
            regions[r.gpa].mm[:] = r.data
    for v in st.vps:
        restore_vp(p.vps[v.index].vcpu, v)
    for chip in st.irqchips:
        p.vm.set_irqchip(ks.kvm_irqchip.from_buffer_copy(chip))
    if st.clock is not None:
        cd = ks.kvm_clock_data.from_buffer_copy(st.clock)
        cd.flags = 0  # only `clock` is set; the other fields are informational
        p.vm.set_clock(cd)
    for i, c in st.intercept_counters.items():
        vp = p.vps[i]
        for n in COUNTER_NAMES:
            mine = getattr(vp, n)
            for k, x in enumerate(c[n]):
                mine[k] += x


def fill_new(p: Partition, st: PartitionState) -> None:
    """Give `p`, a fresh partition made for `st` (Partition.from_state makes it), the state's
    RAM regions and VPs, then restore `st` into it. The partition's class is not imported
    here: it imports this module."""
    if st.version != STATE_VERSION:
        raise StateError(f"state version {st.version} is not {STATE_VERSION}: cannot restore it")
    for r in st.regions:
        p.add_memory(r.gpa, r.size, readonly=r.readonly, track_dirty=r.track_dirty)
    for v in st.vps:
        p.create_vp(v.index)
    restore_into(p, st)


__all__ = [
    "PartitionState",
    "RegionSavedState",
    "StateError",
    "VpSavedState",
    "fill_new",
    "restore_into",
    "save_partition",
]
