"""Creating a VM in the cluster (`pyhv vm create NAME --cluster ENDPOINTS`): place it
(pyhv.cluster.placement) on the live hosts' published capacity, record it in etcd (its
configuration and groups, name unique in the cluster by compare-and-swap), make the chosen host
its owner, and create it through that host's VMMS API. If the host refuses, the records are
taken back.

How a host's API is reached is one function, `host_client`: the host's TCP API with that host's
cluster token (STATE/cluster-token: it may create, start and migrate out VMs, nothing else;
pyhv.vmms.auth) from a tokens file, over mutual TLS when the host serves it (its record carries its
certificate's fingerprint; the caller's certificate and the cluster CA, pyhv.cluster.pki); a
migration source is given the destination's migration token (scoped to bringing a VM in).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyhv.cluster import history, ownership
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
from pyhv.vmms.client import ClientError, ClientTls, VmmsClient

TOKENS_ENV = "PYHV_CLUSTER_TOKENS"


class ProvisionError(RuntimeError):
    """The VM could not be created in the cluster: the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class HostTokens:
    """A host's API tokens: `api`, what the cluster places VMs with (its STATE/cluster-token,
    scoped to creating, starting and migrating out VMs; its admin token works too), and
    `migration` (its STATE/migration-token, which can only bring a VM in: what a migration
    source is given)."""

    api: str
    migration: str = ""


def read_tokens(path: Path | None) -> dict[str, HostTokens]:
    """A tokens file, readable by its owner only: one `HOST CLUSTER_TOKEN [MIGRATION_TOKEN]`
    per line (# comments)."""
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
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) not in (2, 3):
            raise ProvisionError(f"{path}:{n}: expected `HOST CLUSTER_TOKEN [MIGRATION_TOKEN]`")
        tokens[words[0]] = HostTokens(*words[1:])
    return tokens


def host_client(
    host: HostRecord, tokens: Mapping[str, HostTokens], tls: ClientTls | None = None
) -> VmmsClient:
    """The one way the cluster reaches a host's VMMS: its cluster token, and mutual TLS (`tls`:
    the cluster CA, this side's certificate) when the host serves TLS."""
    if not host.api:
        raise ProvisionError(
            f"host {host.name} publishes no API address: run its VMMS with --tcp HOST:PORT"
        )
    held = tokens.get(host.name)
    if held is None:
        raise ProvisionError(
            f"no token for host {host.name}: add `{host.name} TOKEN` (its STATE/cluster-token) "
            f"to the tokens file (--tokens or ${TOKENS_ENV})"
        )
    if host.fingerprint and tls is None:
        raise ProvisionError(
            f"host {host.name} serves mutual TLS: give the cluster CA and a certificate it "
            "signed (--tls-ca/--tls-cert/--tls-key or $PYHV_TLS_CA/CERT/KEY; `pyhv cluster "
            "add-host NAME` makes one)"
        )
    return VmmsClient(
        tcp=host.api, token=held.api, timeout=60, tls=tls if host.fingerprint else None
    )


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
    tokens: Mapping[str, HostTokens],
    affinity: tuple[str, ...] = (),
    anti_affinity: tuple[str, ...] = (),
    ha: bool = False,
    tls: ClientTls | None = None,
) -> tuple[str, dict[str, Any]]:
    """Place and create the VM `config` describes (as `POST /api/vms` takes it, sizes in
    bytes); the chosen host's name and its VMMS's answer. `ha`: restarted on another host when
    its host's lease ends (pyhv.cluster.ha)."""
    name = str(config["name"])
    startup = int(config.get("memory", 512 << 20))
    dynamic = bool(config.get("dynamic_memory"))
    minimum = int(config.get("minimum", 256 << 20)) if dynamic else startup
    hosts = read_hosts(etcd)
    by_name = {h.name: h for h in hosts}
    chosen = place(
        VmDemand(name, startup, minimum, affinity, anti_affinity), host_spaces(etcd, hosts)
    )
    client = host_client(by_name[chosen.name], tokens, tls)
    record = VmRecord(name, config, "off", list(affinity), list(anti_affinity), 1, ha)
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
    history.append(etcd, name, "placed", chosen.name, token=held.token)
    return chosen.name, answer
