"""Helpers of the cluster tests: `pyhv(...)` runs a pyhv command line (never a traceback),
`cluster_hosts` starts real VMMS hosts joined to one etcd with a tokens file for them,
`publishes` says whether a host's record lists a VM, and `ha_restart` kills a host running a
highly available guest and measures how soon the guest's console answers on another host
(the HA test and bench/cluster.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pyhv.cluster import election, ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import HOSTS, HostRecord, decode, host_key
from pyhv.vmms.client import ClientError
from tests.support.hostkill import kill_host
from tests.support.wait import wait_for
from tests.vmms.vmms_process import ROOT, VmmsProcess


def pyhv(
    *args: str, timeout: float = 280, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`pyhv ARGS` (with `env` added to the environment)."""
    r = subprocess.run(
        [sys.executable, "-m", "pyhv.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert "Traceback" not in r.stderr, r.stderr
    return r


@contextmanager
def cluster_hosts(
    tmp: Path,
    etcd: Etcd,
    budgets: dict[str, str],
    lease_ttl: int = 5,
    extra: Sequence[str] = (),
    per_host: Callable[[str], Sequence[str]] = lambda name: (),
    wrap: Callable[[str], Sequence[str]] = lambda name: (),
    tcp: Callable[[str], str] = lambda name: "127.0.0.1:0",
) -> Iterator[tuple[dict[str, VmmsProcess], Path]]:
    """A `pyhv vmms serve --cluster E --host NAME` per name (with its memory budget), all
        joined (`extra`: more `vmms serve` arguments; `per_host(NAME)`: host NAME's own, e.g. its
        certificate; `wrap(NAME)`, `tcp(NAME)`: its command prefix and API address, e.g. a network
    namespace's), and a tokens file (tmp/tokens, lines `HOST CLUSTER_TOKEN MIGRATION_TOKEN`) for
        them; the hosts stop on exit."""
    hosts: dict[str, VmmsProcess] = {}
    try:
        for name, budget in budgets.items():
            args = ["--cluster", etcd.endpoints[0], "--host", name, "--lease-ttl", str(lease_ttl)]
            args += [*extra, *per_host(name)]
            hosts[name] = VmmsProcess(
                tmp, name, budget, extra=tuple(args), wrap=tuple(wrap(name)), tcp=tcp(name)
            )
        wait_for(lambda: len(etcd.get_prefix(HOSTS)[0]) == len(budgets), 30, "the hosts joined")
        tokens = tmp / "tokens"
        tokens.touch(mode=0o600)
        tokens.write_text(
            "".join(
                f"{n} {(h.state / 'cluster-token').read_text().strip()} "
                f"{h.token_file.read_text().strip()}\n"
                for n, h in hosts.items()
            )
        )
        yield hosts, tokens
    finally:
        for h in hosts.values():
            h.close()


def publishes(etcd: Etcd, host: str, vm: str) -> bool:
    kv = etcd.get(host_key(host))
    return kv is not None and any(v.name == vm for v in decode(kv.key, kv.value, HostRecord).vms)


def first_serial_byte(
    hosts: Mapping[str, VmmsProcess], vm: str, timeout: float
) -> tuple[str, float]:
    """The host where VM `vm` runs and the monotonic time its console gave its first byte
    there (an upper bound: the console is polled every 50 ms)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, h in hosts.items():
            try:
                if h.state_of(vm) != "running":
                    continue
                with h.client.console(vm) as sock:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    if sock.recv(1):
                        return name, time.monotonic()
            except (ClientError, OSError):
                continue  # not there yet, or it ended meanwhile
        time.sleep(0.05)
    raise AssertionError(f"VM {vm} gave no serial byte on any of {sorted(hosts)} in {timeout} s")


@dataclass
class HaRestart:
    """One HA restart measured: the VM's host before and after, and the seconds from the kill
    to its first serial byte at the new host."""

    source: str
    destination: str
    seconds: float
    killed: list[int]
    token_before: int


@contextmanager
def ha_restart(
    tmp: Path, etcd: Etcd, names: Sequence[str] = ("a", "b"), lease_ttl: int = 5
) -> Iterator[tuple[dict[str, VmmsProcess], HaRestart]]:
    """Hosts `names` (1G each, every one standing for the leader: HA restart is the leader's),
    a highly available guest `g` started on its host, then every process of that host killed
    at once; yields the hosts and the measured restart while the hosts still run."""
    tokens = tmp / "tokens"
    extra = ("--balance-every", "300", "--balance-policy", "host-only",
             "--cluster-tokens", str(tokens))  # fmt: skip
    with cluster_hosts(tmp, etcd, dict.fromkeys(names, "1G"), lease_ttl, extra) as (hosts, _):
        r = pyhv("vm", "create", "g", "--memory", "128M", "--ha", "--cluster",
                 etcd.endpoints[0], "--tokens", str(tokens))  # fmt: skip
        assert r.returncode == 0, r.stderr
        held = ownership.owner(etcd, "g")
        assert held is not None
        source = hosts[held.host]
        source.vm("start", "g")
        assert "ticks" in source.shell("g", "ticks", b"ticks: ")  # the guest answers
        wait_for(lambda: election.leader(etcd), 30, "a host leading the cluster balancer")
        killed = kill_host(source.proc.pid, source.state)
        killed_at = time.monotonic()
        others = {n: h for n, h in hosts.items() if n != held.host}
        where, at = first_serial_byte(others, "g", lease_ttl + 60)
        yield hosts, HaRestart(held.host, where, round(at - killed_at, 2), killed, held.token)
