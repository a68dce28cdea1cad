"""Placement: which host a new (or restarted) VM goes to. Pure logic: hosts and a VM in, a host
or a `NoPlacement` saying what is short where, out. The same code places VMs on real hosts
(`pyhv vm create --cluster`) and in the fleet simulator.

A host fits when
- its free pool above the reserve holds the VM's startup memory (what it is given at start);
- it can guarantee every VM its minimum: the minimums of its VMs plus this one stay within its
  memory for VMs (total less reserve);
- affinity: if a VM of one of the VM's affinity groups runs somewhere, only that host fits;
- anti-affinity: no VM of one of its anti-affinity groups runs on the host.
Of the hosts that fit, the one with the most free memory after the start wins (spreading keeps
room for the VMs' growth), ties by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

MIB = 1 << 20


class NoPlacement(RuntimeError):
    """No host fits: the message lists each host and what it is short of."""


@dataclass(frozen=True, slots=True)
class HostSpace:
    """A host as placement sees it (bytes). `groups`: group name -> VMs of it on this host."""

    name: str
    total: int  # memory for VMs, reserve excluded
    free: int  # free pool above the reserve
    minimums: int  # the sum of its VMs' minimums
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class VmDemand:
    """What a VM asks of a host (bytes) and its groups."""

    name: str
    startup: int
    minimum: int
    affinity: tuple[str, ...] = ()
    anti_affinity: tuple[str, ...] = ()


def _mib(n: int) -> str:
    return f"{n / MIB:.0f} MiB"


def why_not(host: HostSpace, vm: VmDemand, affine_hosts: Mapping[str, str]) -> str | None:
    """Why `vm` does not fit on `host` (None: it fits). `affine_hosts`: affinity group -> the
    host its VMs run on."""
    for group in vm.affinity:
        there = affine_hosts.get(group)
        if there is not None and there != host.name:
            return f"affinity group {group!r} runs on {there}"
    for group in vm.anti_affinity:
        members = host.groups.get(group, ())
        if members:
            return f"anti-affinity group {group!r} has {', '.join(members)} here"
    if vm.startup > host.free:
        return (
            f"{_mib(host.free)} free above the reserve, {_mib(vm.startup)} startup wanted "
            f"({_mib(vm.startup - host.free)} short)"
        )
    if host.minimums + vm.minimum > host.total:
        return (
            f"minimums of its VMs {_mib(host.minimums)} of {_mib(host.total)}: "
            f"{_mib(vm.minimum)} more cannot be guaranteed"
        )
    return None


def affinity_hosts(hosts: Sequence[HostSpace]) -> dict[str, str]:
    """Where each group's VMs run (a group's first host by name)."""
    out: dict[str, str] = {}
    for h in sorted(hosts, key=lambda h: h.name):
        for group, members in h.groups.items():
            if members:
                out.setdefault(group, h.name)
    return out


def place(vm: VmDemand, hosts: Sequence[HostSpace]) -> HostSpace:
    """The host `vm` goes to; NoPlacement listing every host's shortfall if none fits."""
    if not hosts:
        raise NoPlacement(f"VM {vm.name!r} fits nowhere: the cluster has no live host")
    affine = affinity_hosts(hosts)
    best: HostSpace | None = None
    reasons = []
    for h in hosts:
        why = why_not(h, vm, affine)
        if why is not None:
            reasons.append(f"{h.name}: {why}")
        elif best is None or (h.free, best.name) > (best.free, h.name):
            best = h
    if best is None:
        raise NoPlacement(
            f"VM {vm.name!r} ({_mib(vm.startup)} startup, {_mib(vm.minimum)} minimum) fits "
            "nowhere: " + "; ".join(sorted(reasons))
        )
    return best
