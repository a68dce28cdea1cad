"""VM ownership with fencing: a VM runs only on the host its ownership key names
(/pyhv/vms/<vm>/owner). The key changes only by compare-and-swap against the revision it was
read at, so two hosts can never both believe they won it, and that revision (the key's mod
revision) is the fencing token: whoever acts for the owner shows the token, and anything that
sees a newer revision knows the token is stale.

Checking the token in the worker before it runs the VM comes with the trusted workers of issue
11 (docs/cluster.md, "next").
"""

from __future__ import annotations

from dataclasses import dataclass

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import vm_owner_key


class OwnershipConflict(RuntimeError):
    """The ownership key was not what the caller expected: the message names the VM, who owns
    it now and at which revision."""


@dataclass(frozen=True, slots=True)
class Ownership:
    """VM `vm` belongs to `host`; `token` is the ownership key's mod revision."""

    vm: str
    host: str
    token: int


def owner(etcd: Etcd, vm: str) -> Ownership | None:
    kv = etcd.get(vm_owner_key(vm))
    return None if kv is None else Ownership(vm, kv.value, kv.mod_revision)


def claim(etcd: Etcd, vm: str, host: str) -> Ownership:
    """Make `host` the owner of an unowned VM (a new VM placed on it)."""
    result = etcd.swap(vm_owner_key(vm), host, 0)
    if not result.succeeded:
        now = result.current
        raise OwnershipConflict(
            f"VM {vm!r} is owned by {now.value if now else '?'} (token "
            f"{now.mod_revision if now else '?'}): it cannot be claimed by {host}"
        )
    return Ownership(vm, host, result.revision)


def move(etcd: Etcd, held: Ownership, to_host: str) -> Ownership:
    """Hand the VM to `to_host`, only if `held` is still current (its token not stale)."""
    result = etcd.swap(vm_owner_key(held.vm), to_host, held.token)
    if not result.succeeded:
        now = result.current
        raise OwnershipConflict(
            f"VM {held.vm!r}: token {held.token} is stale (owner now "
            f"{now.value if now else 'nobody'} at {now.mod_revision if now else '-'}): "
            f"read the owner again before moving it to {to_host}"
        )
    return Ownership(held.vm, to_host, result.revision)


def release(etcd: Etcd, held: Ownership) -> None:
    """Give the VM up (it was deleted), only if `held` is still current."""
    result = etcd.swap(vm_owner_key(held.vm), None, held.token)
    if not result.succeeded:
        raise OwnershipConflict(f"VM {held.vm!r}: token {held.token} is stale: it was not released")
