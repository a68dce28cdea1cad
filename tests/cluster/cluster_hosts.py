"""Helpers of the cluster tests: `pyhv(...)` runs a pyhv command line (never a traceback),
`cluster_hosts` starts real VMMS hosts joined to one etcd with a tokens file for them, and
`publishes` says whether a host's record lists a VM."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pyhv.cluster.etcd import Etcd
from pyhv.cluster.records import HOSTS, HostRecord, decode, host_key
from tests.support.wait import wait_for
from tests.vmms.vmms_process import ROOT, VmmsProcess


def pyhv(*args: str, timeout: float = 280) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [sys.executable, "-m", "pyhv.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
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
) -> Iterator[tuple[dict[str, VmmsProcess], Path]]:
    """A `pyhv vmms serve --cluster E --host NAME` per name (with its memory budget), all
    joined (`extra`: more `vmms serve` arguments), and a tokens file (tmp/tokens, lines
    `HOST ADMIN_TOKEN MIGRATION_TOKEN`) for them; the hosts stop on exit."""
    hosts: dict[str, VmmsProcess] = {}
    try:
        for name, budget in budgets.items():
            args = ["--cluster", etcd.endpoints[0], "--host", name, "--lease-ttl", str(lease_ttl)]
            args += extra
            hosts[name] = VmmsProcess(tmp, name, budget, extra=tuple(args))
        wait_for(lambda: len(etcd.get_prefix(HOSTS)[0]) == len(budgets), 30, "the hosts joined")
        tokens = tmp / "tokens"
        tokens.touch(mode=0o600)
        tokens.write_text(
            "".join(
                f"{n} {h.admin_token_file.read_text().strip()} {h.token_file.read_text().strip()}\n"
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
