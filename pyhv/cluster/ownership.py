"""VM ownership with fencing: a VM runs only on the host its ownership key names
(/pyhv/vms/<vm>/owner). The key changes only by compare-and-swap against the revision it was
read at, so two hosts can never both believe they won it, and that revision (the key's mod
revision) is the fencing token: whoever acts for the owner shows the token, and anything that
sees a newer revision knows the token is stale.

A host starts a VM only after `confirm`: a compare-and-swap that rewrites the key with the same
host against the revision the host read, so the token advances. Either the start or a move made
with the older token wins, never both: a VMMS acting on a stale view starts nothing, and a
leader acting on one moves nothing (docs/cluster.md, "Ownership and fencing"). The check is the
VMMS's, not the worker's: a jailed worker has no network to reach etcd with (pyhv.worker.jail).
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


def confirm(etcd: Etcd, held: Ownership) -> Ownership:
    """Make `held` the VM's current ownership for a start: rewrite the key (same host) only if
    its token is still `held.token`; the new token is the one the VM runs under."""
    result = etcd.swap(vm_owner_key(held.vm), held.host, held.token)
    if not result.succeeded:
        now = result.current
        raise OwnershipConflict(
            f"VM {held.vm!r}: token {held.token} is stale (owner now "
            f"{now.value if now else 'nobody'} at {now.mod_revision if now else '-'}): "
            f"{held.host} must not start it"
        )
    return Ownership(held.vm, held.host, result.revision)


def release(etcd: Etcd, held: Ownership) -> None:
    """Give the VM up (it was deleted), only if `held` is still current."""
    result = etcd.swap(vm_owner_key(held.vm), None, held.token)
    if not result.succeeded:
        raise OwnershipConflict(f"VM {held.vm!r}: token {held.token} is stale: it was not released")
