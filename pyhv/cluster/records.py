"""What the cluster keeps in etcd: the key layout and the record stored under each key, declared
once (msgspec structs: JSON on the wire, checked on the way in). docs/cluster.md describes them.

    /pyhv/hosts/<host>          HostRecord, under the host's lease (gone when the host is)
    /pyhv/vms/<vm>/config       VmRecord: configuration, desired state, groups, generation
    /pyhv/vms/<vm>/owner        the owner host's name; its mod revision is the fencing token
    /pyhv/vms/<vm>/moved        when its last live migration by the cluster balancer ended
    /pyhv/vms/<vm>/history      VmHistory: where it was placed, moved and restarted (HA)
    /pyhv/leader/balancer       the cluster balancer leader's host name, under its lease
    /pyhv/migrations/<vm>       MigrationRecord of a live migration in flight

A record read from etcd was written by another host: a record that does not decode is refused
with a `RecordError` naming the key, never taken half.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta, Struct

ROOT = "/pyhv/"
HOSTS = ROOT + "hosts/"
VMS = ROOT + "vms/"
LEADER = ROOT + "leader/balancer"
MIGRATIONS = ROOT + "migrations/"

Bytes = Annotated[int, Meta(ge=0)]
Percent = Annotated[float, Meta(ge=0)]
HOST_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HostName = Annotated[str, Meta(pattern=HOST_NAME_RE.pattern)]


#: HOST:PORT (an IPv4 address or a name), or "" for none: another host connects to it.
Address = Annotated[str, Meta(pattern=r"^$|^[A-Za-z0-9_.-]+:[0-9]{1,5}$")]


def check_host_name(name: str) -> str:
    """A host's name as the cluster keys it; ValueError with the rule otherwise."""
    if not HOST_NAME_RE.match(name):
        raise ValueError(
            f"host name {name!r}: use 1-63 letters, digits, '.', '_' or '-', starting with a "
            "letter or digit"
        )
    return name


def host_key(host: str) -> str:
    return HOSTS + host


def vm_config_key(vm: str) -> str:
    return f"{VMS}{vm}/config"


def vm_owner_key(vm: str) -> str:
    return f"{VMS}{vm}/owner"


def vm_moved_key(vm: str) -> str:
    return f"{VMS}{vm}/moved"


def vm_history_key(vm: str) -> str:
    return f"{VMS}{vm}/history"


def migration_key(vm: str) -> str:
    return MIGRATIONS + vm


class RecordError(ValueError):
    """A record in etcd does not decode: the message names the key and what was wrong."""


class VmSummary(Struct, frozen=True, forbid_unknown_fields=True):
    """One running VM as its host publishes it (bytes): what the cluster balancer reads."""

    name: str
    assigned: Bytes
    startup: Bytes
    minimum: Bytes
    maximum: Bytes
    demand: Bytes | None = None  # committed memory the guest reported (None: not yet)
    target: Bytes = 0  # what the host balancer aims at: demand + buffer within min..max
    dirty_bytes_per_s: Bytes = 0


class PressureSummary(Struct, frozen=True, forbid_unknown_fields=True):
    """The host balancer's view in one line: average and highest pressure (%), and whether
    the host is short (its VMs' targets exceed what it can give)."""

    average: Percent = 0.0
    highest: Percent = 0.0
    short: bool = False


class HostRecord(Struct, frozen=True, forbid_unknown_fields=True):
    """A host of the cluster, published by its VMMS under its lease (pyhv.cluster.membership).
    `total` is the VMMS's memory budget, `free` its free pool above the reserve."""

    name: HostName
    api: Address  # HOST:PORT of its VMMS API ("" when it serves only the Unix socket)
    migration: Annotated[str, Meta(pattern=r"^[^\s:/]*$")]  # HOST incoming migrations listen on
    total: Bytes
    free: Bytes
    reserve: Bytes
    vms: list[VmSummary] = []
    pressure: PressureSummary = PressureSummary()
    fingerprint: str = ""  # its TLS certificate's SHA-256 (pyhv.cluster.pki); "": plain HTTP
    published: float = 0.0  # wall-clock time of this record


class VmRecord(Struct, frozen=True, forbid_unknown_fields=True):
    """A VM of the cluster: its VMMS configuration (as `pyhv vm create` takes it), the state it
    should be in, its affinity and anti-affinity groups, and a generation bumped on every
    change."""

    name: str
    config: dict[str, Any]
    desired: Annotated[str, Meta(pattern="^(running|off)$")] = "off"
    affinity: list[str] = []
    anti_affinity: list[str] = []
    generation: Annotated[int, Meta(ge=0)] = 0
    #: Highly available: when its owner host's lease ends, the cluster balancer's leader
    #: starts it on another host (pyhv.cluster.ha), if it should be running.
    ha: bool = False


class VmEvent(Struct, frozen=True, forbid_unknown_fields=True):
    """One change of where a VM runs: `placed` (created on `host`), `moved` (live-migrated from
    `source`), `restarted` (cold-started on `host` after `source`'s lease ended), with the
    owner token it got and when (seconds since the epoch)."""

    at: float
    kind: Annotated[str, Meta(pattern="^(placed|moved|restarted)$")]
    host: HostName
    source: str = ""
    token: Annotated[int, Meta(ge=0)] = 0
    why: str = ""


class VmHistory(Struct, frozen=True, forbid_unknown_fields=True):
    """A VM's last `HISTORY_KEPT` events, oldest first."""

    events: list[VmEvent] = []


HISTORY_KEPT = 50


class MigrationRecord(Struct, frozen=True, forbid_unknown_fields=True):
    """A live migration in flight, written by the cluster balancer's leader before it starts."""

    vm: str
    source: str
    destination: str
    bytes: Bytes = 0
    started: float = 0.0
    fencing_token: int = 0  # the ownership key's mod revision the move was planned at


T = TypeVar("T")


def encode(record: Struct) -> str:
    return msgspec.json.encode(record).decode()


def decode(key: str, text: str, kind: type[T]) -> T:
    try:
        return msgspec.json.decode(text, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as e:
        raise RecordError(f"etcd key {key} does not hold a valid {kind.__name__}: {e}") from None
