"""The cluster balancer's leader, elected on a lease: a candidate writes its host name to
/pyhv/leader/balancer under its own lease only if the key does not exist (compare-and-swap on
mod revision 0). The leader stays leader while it keeps its lease; when its lease ends (it
resigned, died or was cut off) the key goes with it and the next campaign wins. The leader's
key revision is its term: a plan made in one term is not carried out in another.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import LEADER


@dataclass(frozen=True, slots=True)
class Leadership:
    """`host` leads since revision `term`, under `lease`."""

    host: str
    term: int
    lease: int


def leader(etcd: Etcd) -> tuple[str, int] | None:
    """The current leader and its term, or None."""
    kv = etcd.get(LEADER)
    return None if kv is None else (kv.value, kv.mod_revision)


def campaign(etcd: Etcd, host: str, lease: int) -> Leadership | None:
    """Become leader under `lease` if nobody is; None if another host leads (or this host
    already does under another lease)."""
    result = etcd.swap(LEADER, host, 0, lease=lease)
    if result.succeeded:
        return Leadership(host, result.revision, lease)
    return None


def still_leading(etcd: Etcd, held: Leadership) -> bool:
    kv = etcd.get(LEADER)
    return kv is not None and kv.mod_revision == held.term and kv.value == held.host


def resign(etcd: Etcd, held: Leadership) -> bool:
    """Step down (only if still leader in the same term)."""
    return etcd.swap(LEADER, None, held.term).succeeded
