"""The VM state that goes with the last dirty pages: a versioned, explicit structure.

Every KVM state of every VP (pyhv.hypervisor.state.save_vp: REGS, SREGS, XSAVE, XCRS, MSRs,
VCPU_EVENTS, MP_STATE, LAPIC, DEBUGREGS), the VM's IRQCHIPs and clock, the serial device, the
per-VP intercept counters, and the Dynamic Memory state when the VM has it. Encoded as JSON with
hex for binary fields (no pickle on a network stream).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pyhv.hypervisor.state import VpSavedState, restore_vp, save_vp
from pyhv.kvm import KvmError
from pyhv.kvm import structs as ks
from pyhv.migration.stream import MigrationError

if TYPE_CHECKING:
    from pyhv.hypervisor import Partition

STATE_VERSION = 1
_BYTES = ("regs", "sregs", "xsave", "xcrs", "events", "lapic", "debugregs")


@dataclass
class VmState:
    version: int
    vps: list[VpSavedState]
    irqchips: list[bytes]
    clock: bytes | None
    uart: dict[str, Any]
    intercept_counters: dict[int, dict[str, list[int]]] = field(default_factory=dict)
    dynmem: dict[str, Any] | None = None

    def encode(self) -> bytes:
        vps = []
        for v in self.vps:
            d = asdict(v)
            for k in _BYTES:
                d[k] = d[k].hex()
            d["msrs"] = {str(i): val for i, val in v.msrs.items()}
            vps.append(d)
        return json.dumps(
            {
                "version": self.version,
                "vps": vps,
                "irqchips": [c.hex() for c in self.irqchips],
                "clock": None if self.clock is None else self.clock.hex(),
                "uart": self.uart,
                "intercept_counters": {str(k): v for k, v in self.intercept_counters.items()},
                "dynmem": self.dynmem,
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes) -> VmState:
        try:
            d = json.loads(raw)
            if d.get("version") != STATE_VERSION:
                raise MigrationError(
                    f"VM state version {d.get('version')} is not {STATE_VERSION}: "
                    "the hosts run different pyhv releases",
                    "state",
                )
            vps = []
            for v in d["vps"]:
                for k in _BYTES:
                    v[k] = bytes.fromhex(v[k])
                v["msrs"] = {int(i): int(val) for i, val in v["msrs"].items()}
                vps.append(VpSavedState(**v))
            return cls(
                version=d["version"],
                vps=vps,
                irqchips=[bytes.fromhex(c) for c in d["irqchips"]],
                clock=None if d["clock"] is None else bytes.fromhex(d["clock"]),
                uart=d["uart"],
                intercept_counters={int(k): v for k, v in d["intercept_counters"].items()},
                dynmem=d.get("dynmem"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MigrationError(f"the VM state frame is malformed: {e!r}", "state") from None


def save_kvm_state(p: Partition) -> tuple[list[VpSavedState], list[bytes], bytes | None]:
    """Every VP's KVM state, the IRQCHIPs and the clock (the VPs must be paused)."""
    running = [vp.index for vp in p.vps.values() if vp.state.value == "running"]
    if running:
        raise MigrationError(f"VPs {running} are still running: pause them first", "state")
    msr_indices = p.kvm.msr_index_list()
    vps = [save_vp(vp.vcpu, msr_indices) for vp in sorted(p.vps.values(), key=lambda v: v.index)]
    irqchips = [bytes(p.vm.get_irqchip(i)) for i in range(3)] if p.irqchip else []
    try:
        clock: bytes | None = bytes(p.vm.get_clock())
    except KvmError:
        clock = None
    return vps, irqchips, clock


def restore_kvm_state(p: Partition, st: VmState) -> None:
    """Into a partition whose VPs exist and do not run: VPs first, then IRQCHIPs and clock
    (the order that worked on this machine's KVM)."""
    if sorted(p.vps) != sorted(v.index for v in st.vps):
        raise MigrationError(
            f"the state has VPs {[v.index for v in st.vps]}, the new VM {sorted(p.vps)}", "state"
        )
    for v in st.vps:
        restore_vp(p.vps[v.index].vcpu, v)
    for chip in st.irqchips:
        p.vm.set_irqchip(ks.kvm_irqchip.from_buffer_copy(chip))
    if st.clock is not None:
        cd = ks.kvm_clock_data.from_buffer_copy(st.clock)
        cd.flags = 0
        p.vm.set_clock(cd)


def save_intercept_counters(p: Partition) -> dict[int, dict[str, list[int]]]:
    return {
        i: {
            "counts": list(vp.counts),
            "defaults": list(vp.defaults),
            "errors": list(vp.errors),
            "handler_ns": list(vp.handler_ns),
        }
        for i, vp in p.vps.items()
    }


def restore_intercept_counters(p: Partition, saved: dict[int, dict[str, list[int]]]) -> None:
    """The counters go on from the source's totals."""
    for i, c in saved.items():
        vp = p.vps.get(i)
        if vp is None:
            continue
        for name in ("counts", "defaults", "errors", "handler_ns"):
            mine: list[int] = getattr(vp, name)
            for k, v in enumerate(c[name][: len(mine)]):
                mine[k] += int(v)
