"""Creating a VM in the cluster (`pyhv vm create NAME --cluster ENDPOINTS`): place it
(pyhv.cluster.placement) on the live hosts' published capacity, record it in etcd (its
configuration and groups, name unique in the cluster by compare-and-swap), make the chosen host
its owner, and create it through that host's VMMS API. If the host refuses, the records are
taken back.

How a host's API is reached is one function, `host_client`: today the host's TCP API with the
bearer token of that host from a tokens file; with issue 11 it becomes mutual TLS and a token
scoped to creating VMs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.placement import HostSpace, VmDemand, place
from pyhv.cluster.records import (
    VMS,
    HostRecord,
    VmRecord,
    decode,
    encode,
    vm_config_key,
)
from pyhv.cluster.snapshot import read_hosts
from pyhv.vmms.client import ClientError, VmmsClient

TOKENS_ENV = "PYHV_CLUSTER_TOKENS"


class ProvisionError(RuntimeError):
    """The VM could not be created in the cluster: the message says why and what to do."""


def read_tokens(path: Path | None) -> dict[str, str]:
    """A tokens file: one `HOST TOKEN` per line (# comments), readable by its owner only."""
    if path is None:
        env = os.environ.get(TOKENS_ENV)
        if not env:
            return {}
        path = Path(env)
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as e:
        raise ProvisionError(f"cannot read the hosts' tokens file {path}: {e}") from None
    if mode & 0o077:
        raise ProvisionError(
            f"the hosts' tokens file {path} is open to others (mode {mode & 0o777:o}): "
            f"chmod 600 {path}"
        )
    tokens = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        host, _, token = line.partition(" ")
        if not token.strip():
            raise ProvisionError(f"{path}:{n}: expected `HOST TOKEN`")
        tokens[host] = token.strip()
    return tokens


def host_client(host: HostRecord, tokens: Mapping[str, str]) -> VmmsClient:
    """The one way this module reaches a host's VMMS (mutual TLS and scoped tokens: issue 11)."""
    if not host.api:
        raise ProvisionError(
            f"host {host.name} publishes no API address: run its VMMS with --tcp HOST:PORT"
        )
    token = tokens.get(host.name)
    if token is None:
        raise ProvisionError(
            f"no token for host {host.name}: add `{host.name} TOKEN` (its STATE/token) to the "
            f"tokens file (--tokens or ${TOKENS_ENV})"
        )
    return VmmsClient(tcp=host.api, token=token, timeout=60)


def host_spaces(etcd: Etcd, hosts: list[HostRecord]) -> list[HostSpace]:
    """Placement's view of the live hosts: their published memory, and the groups of the VMs
    each owns (from the VMs' records and owner keys)."""
    kvs, _ = etcd.get_prefix(VMS)
    records: dict[str, VmRecord] = {}
    owners: dict[str, str] = {}
    for kv in kvs:
        vm, _, leaf = kv.key[len(VMS) :].partition("/")
        if leaf == "config":
            records[vm] = decode(kv.key, kv.value, VmRecord)
        elif leaf == "owner":
            owners[vm] = kv.value
    groups: dict[str, dict[str, list[str]]] = {h.name: {} for h in hosts}
    for vm, rec in sorted(records.items()):
        on = groups.get(owners.get(vm, ""))
        if on is not None:
            for g in (*rec.affinity, *rec.anti_affinity):
                on.setdefault(g, []).append(vm)
    return [
        HostSpace(
            h.name,
            total=max(0, h.total - h.reserve),
            free=h.free,
            minimums=sum(v.minimum for v in h.vms),
            groups={g: tuple(m) for g, m in groups[h.name].items()},
        )
        for h in hosts
    ]


def create(
    etcd: Etcd,
    config: dict[str, Any],
    tokens: Mapping[str, str],
    affinity: tuple[str, ...] = (),
    anti_affinity: tuple[str, ...] = (),
) -> tuple[str, dict[str, Any]]:
    """Place and create the VM `config` describes (as `POST /api/vms` takes it, sizes in
    bytes); the chosen host's name and its VMMS's answer."""
    name = str(config["name"])
    startup = int(config.get("memory", 512 << 20))
    dynamic = bool(config.get("dynamic_memory"))
    minimum = int(config.get("minimum", 256 << 20)) if dynamic else startup
    hosts = read_hosts(etcd)
    by_name = {h.name: h for h in hosts}
    chosen = place(
        VmDemand(name, startup, minimum, affinity, anti_affinity), host_spaces(etcd, hosts)
    )
    client = host_client(by_name[chosen.name], tokens)
    record = VmRecord(name, config, "off", list(affinity), list(anti_affinity), 1)
    if not etcd.swap(vm_config_key(name), encode(record), 0).succeeded:
        raise ProvisionError(f"the cluster has a VM named {name!r}: pick another name")
    held = None
    try:
        held = ownership.claim(etcd, name, chosen.name)
        answer = client.request("POST", "/api/vms", config)
    except (ClientError, OSError, ownership.OwnershipConflict) as e:
        if held is not None:
            ownership.release(etcd, held)
        etcd.delete(vm_config_key(name))
        raise ProvisionError(f"host {chosen.name} did not create VM {name!r}: {e}") from None
    return chosen.name, answer
