"""A VM's history in the cluster (/pyhv/vms/<vm>/history): where it was placed, moved and
restarted, appended by whoever changed its owner (provision, the executor, HA restart) and
shown by `pyhv vm show NAME --cluster`. Appended by compare-and-swap, so two writers never lose
each other's event."""

from __future__ import annotations

import time

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import (
    HISTORY_KEPT,
    VmEvent,
    VmHistory,
    decode,
    encode,
    vm_history_key,
)


def read(etcd: Etcd, vm: str) -> list[VmEvent]:
    kv = etcd.get(vm_history_key(vm))
    return [] if kv is None else decode(kv.key, kv.value, VmHistory).events


def append(
    etcd: Etcd, vm: str, kind: str, host: str, *, source: str = "", token: int = 0, why: str = ""
) -> VmEvent:
    event = VmEvent(time.time(), kind, host, source, token, why)
    key = vm_history_key(vm)
    for _ in range(20):
        kv = etcd.get(key)
        events = [] if kv is None else decode(key, kv.value, VmHistory).events
        record = VmHistory([*events, event][-HISTORY_KEPT:])
        if etcd.swap(key, encode(record), 0 if kv is None else kv.mod_revision).succeeded:
            return event
    raise RuntimeError(f"VM {vm!r}: its history kept changing under 20 appends")  # pragma: no cover
