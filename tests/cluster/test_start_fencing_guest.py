"""The fencing token at start, with a real etcd, a real VMMS and a real guest: a host confirms
the VM's owner by compare-and-swap before it starts the VM. When the owner key moved after the
host read it (the test moves it in between, through the VMMS's test hook), the start is refused
and no worker is ever spawned; a start with a current token runs the guest and advances the
token, so a move planned with the token read before the start fails."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.membership import HOLD_START_ENV
from pyhv.vmms.client import ClientError
from tests.cluster.cluster_hosts import cluster_hosts, pyhv
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for
from tests.vmms.vmms_process import VmmsProcess

pytestmark = pytest.mark.guest


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (the VMMS's workers, their jails)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def _start(host: VmmsProcess, vm: str) -> dict[str, object]:
    """POST /api/vms/VM/start with the host's cluster token in a thread; what it answered."""
    client = host.tcp_client(host.state / "cluster-token")
    answer: dict[str, object] = {}

    def run() -> None:
        try:
            answer["ok"] = client.request("POST", f"/api/vms/{vm}/start")
        except ClientError as e:
            answer["error"], answer["status"] = str(e), e.status

    t = threading.Thread(target=run, daemon=True)
    t.start()
    answer["thread"] = t
    return answer


def test_a_start_with_a_stale_fencing_token_is_refused_and_the_guest_never_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hold = tmp_path / "hold"
    hold.mkdir()
    monkeypatch.setenv(HOLD_START_ENV, str(hold))
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        with cluster_hosts(tmp_path, etcd, {"a": "1G"}) as (hosts, tokens):
            a = hosts["a"]
            r = pyhv(
                "vm", "create", "g", "--memory", "128M", "--static",
                "--cluster", server.endpoint, "--tokens", str(tokens),
            )  # fmt: skip
            assert r.returncode == 0 and "placed on host a" in r.stderr, r.stderr
            read = ownership.owner(etcd, "g")
            assert read is not None and read.host == "a"

            # The VMMS reads the owner (a, token T), then the owner moves before it acts.
            answer = _start(a, "g")
            wait_for(lambda: (hold / "g.read").exists(), 60, "the start reading g's owner")
            moved = ownership.move(etcd, read, "b")
            (hold / "g.go").touch()
            answer["thread"].join(60)  # type: ignore[attr-defined]
            assert answer.get("status") == 409, answer
            assert f"token {read.token} is stale (owner now b at {moved.token})" in str(
                answer["error"]
            )
            assert a.state_of("g") == "off"
            assert _descendants(a.proc.pid) == [], "a worker was spawned for a refused start"
            assert "VM g not started: VM 'g': token" in Path(a.log.name).read_text()
            now = ownership.owner(etcd, "g")
            assert now is not None and (now.host, now.token) == ("b", moved.token)

            # Given back to a (the leader's compare-and-swap), a start confirms and runs it.
            back = ownership.move(etcd, moved, "a")
            (hold / "g.read").unlink()
            answer = _start(a, "g")
            answer["thread"].join(120)  # type: ignore[attr-defined]
            assert "ok" in answer, answer
            assert "ticks" in a.shell("g", "ticks", b"ticks: ")  # the guest runs
            running = ownership.owner(etcd, "g")
            assert running is not None and running.host == "a" and running.token > back.token
            # A leader that read the owner before this start cannot move the VM away.
            with pytest.raises(ownership.OwnershipConflict, match="is stale"):
                ownership.move(etcd, back, "b")
