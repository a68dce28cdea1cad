"""`pyhv vm migrate` between two `pyhv vmms serve` instances (separate state directories, TCP on
127.0.0.1) with the reference guest under KVM: the VM moves while its `dirty` task writes, runs
at the destination (its shell answers, its clock goes on), and is gone at the source, whose pool
got the memory back; a wrong token or a destination without the memory fails cleanly; the
connection lost after COMMIT is settled by asking the destination VMMS."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyhv.vmms.client import ClientError
from tests.support.certs import make_ca
from tests.support.wait import wait_for
from tests.vmms.vmms_process import VmmsProcess, migrate_api, touched, vmms_pair

pytestmark = pytest.mark.guest

MIB = 1 << 20


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[VmmsProcess, VmmsProcess]]:
    with vmms_pair(tmp_path) as pair:
        yield pair


def _start_dirtying(host: VmmsProcess, name: str, memory: str, mib: int) -> None:
    """A VM whose `dirty` task writes `mib` MiB over and over, started on `host` and waited
    for until the task has written its working set once."""
    host.vm("create", name, "--memory", memory)
    host.vm("start", name)
    assert "dirty" in host.shell(name, f"dirty {mib}")
    wait_for(lambda: touched(host, name) >= mib * 256, 60, f"{mib} MiB touched")


def test_pyhv_vm_migrate_moves_a_running_vm_to_another_vmms_where_its_shell_answers(
    hosts: tuple[VmmsProcess, VmmsProcess],
) -> None:
    a, b = hosts
    free_a, free_b = a.free(), b.free()
    _start_dirtying(a, "mover", "256M", 16)
    before = a.ticks("mover")
    out = a.vm("migrate", "mover", "--to", b.address, "--token-file", str(b.token_file))
    assert "migrated in" in out and f"mover runs on {b.address} now" in out, out
    assert re.search(r"done \[#+\] sent", out), out  # the progress bar's last line
    # B runs it, A has forgotten it and its pool has the memory back.
    listing = b.vm("list")
    assert re.search(r"mover\s+running", listing), listing
    assert "mover" not in a.vm("list") and "mover" not in a.names()
    assert a.free() == free_a and b.free() == free_b - 256 * MIB
    after = b.ticks("mover")
    assert after > before
    written = touched(b, "mover")
    assert b.ticks("mover") > after  # its clock goes on there
    # and its dirty task goes on writing
    wait_for(lambda: touched(b, "mover") > written, 60, "the dirty task writing on B")
    b.vm("stop", "mover")
    assert b.free() == free_b


def test_a_wrong_token_a_destination_without_the_memory_or_a_cut_leave_the_vm_running_at_the_source(
    hosts: tuple[VmmsProcess, VmmsProcess],
) -> None:
    a, b = hosts
    free_b = b.free()
    a.vm("create", "stay", "--memory", "1G")
    a.vm("start", "stay")
    bad = a.state / "wrong-token"
    bad.write_text("not-the-token-of-b\n")
    wrong = a.vm("migrate", "stay", "--to", b.address, "--token-file", str(bad), check=False)
    assert "refused the token (401)" in wrong
    full = a.vm(
        "migrate", "stay", "--to", b.address, "--token-file", str(b.token_file), check=False
    )
    assert "not enough host memory for 1G on the destination" in full
    for _ in (wrong, full):
        assert a.state_of("stay") == "running"
    assert "ticks: " in a.shell("stay", "ticks", b"ticks: ")
    assert b.names() == [] and b.free() == free_b
    # A connection cut in the middle of the first pass: the VM runs on at A, B drops it all.
    a.vm("create", "cut", "--memory", "256M")
    a.vm("start", "cut")
    rec = migrate_api(a, b, "cut", {"pass1": "cut"})
    assert rec["state"] == "failed" and "during pass1" in rec["error"], rec
    assert a.state_of("cut") == "running" and a.ticks("cut") > 0
    wait_for(lambda: not b.names() and b.free() == free_b, 30, "B without the VM")
    assert b.names() == [] and b.free() == free_b


def test_a_connection_lost_after_commit_is_settled_by_asking_the_destination_vmms(
    hosts: tuple[VmmsProcess, VmmsProcess],
) -> None:
    a, b = hosts
    free_a, free_b = a.free(), b.free()
    a.vm("create", "doubt", "--memory", "256M")
    a.vm("start", "doubt")
    # Cut before the commit point (the state and the last pages' PASS_END) went out: the
    # destination cannot run it, the source knows it without asking and resumes its copy.
    rec = migrate_api(a, b, "doubt", {"commit": "cut"})
    assert rec["state"] == "failed" and "failed during commit" in rec["error"], rec
    assert "the VM keeps running here" in rec["error"], rec
    assert a.state_of("doubt") == "running" and a.ticks("doubt") > 0
    wait_for(lambda: not b.names(), 30, "B without the VM")
    assert b.names() == [] and b.free() == free_b
    # Cut after COMMIT went out, before RESUMED was read: it runs at the destination, so the
    # source stops its paused copy (never running on both).
    rec = migrate_api(a, b, "doubt", {"resumed": "cut"})
    assert rec["state"] == "done" and "confirmed the VM runs there" in rec["error"], rec
    assert b.state_of("doubt") == "running" and b.ticks("doubt") > 0
    assert "doubt" not in a.names() and a.free() == free_a


def test_a_dynamic_memory_vm_moved_by_the_vmms_is_balanced_by_the_destination_vmms(
    hosts: tuple[VmmsProcess, VmmsProcess],
) -> None:
    a, b = hosts
    free_b = b.free()
    a.vm("create", "dm1", "--memory", "256M", "--dynamic", "--minimum", "128M", "--maximum", "1G")
    a.vm("start", "dm1")
    wait_for(
        lambda: a.client.request("GET", "/api/vms/dm1/memory")["committed"] is not None,
        60,
        "dm1's guest DM driver reporting to A",
    )
    out = a.vm("migrate", "dm1", "--to", b.address, "--token-file", str(b.token_file))
    assert f"dm1 runs on {b.address} now" in out, out
    assert b.free() == free_b - 256 * MIB
    # B's balancer answers the guest's new demand with a hot-add from B's pool.
    assert "committed 300 MiB" in b.shell("dm1", "testlimit -m 300 -c 1", b"committed 300 MiB")

    def added() -> dict[str, Any] | None:
        status: dict[str, Any] = b.client.request("GET", "/api/vms/dm1/memory")
        committed = status["committed"] or 0
        return (
            status
            if committed >= 300 * MIB and status["visible"] >= committed * 1.2 - MIB
            else None
        )

    # reports once a second, a few Add operations as they catch up
    status = wait_for(added, 60, "dm1 on B given its demand and buffer", 0.1)
    assert status["visible"] >= (status["committed"] or 0) * 1.2 - MIB > 300 * MIB
    # the pool follows the worker at B's next tick
    wait_for(lambda: b.free() < free_b - 300 * MIB, 30, "B's pool following the worker")
    b.vm("stop", "dm1")
    assert b.free() == free_b


def test_a_vm_migrates_over_mutual_tls_with_the_destinations_migration_token_only(
    tmp_path: Path,
) -> None:
    """Both VMMSes serve TLS with certificates from one CA and ask for client certificates
    (the destination on every address, as beyond loopback); the source speaks TLS to the
    destination with its own certificate and the destination's migration token (which can do
    nothing else there), and the VM's shell answers there."""
    ca = make_ca(tmp_path / "ca")
    with contextlib.ExitStack() as stack:
        a = VmmsProcess(tmp_path, "a", "3G", ca=ca)
        stack.callback(a.close)
        b = VmmsProcess(tmp_path, "b", "1G", ca=ca, tcp="0.0.0.0:0")
        stack.callback(b.close)
        assert "https://0.0.0.0:" in Path(b.log.name).read_text()
        # The migration token of B is refused for anything but bringing a VM in.
        with pytest.raises(ClientError, match="may only bring a VM in") as e:
            b.tcp_client(b.token_file).request("GET", "/api/vms")
        assert e.value.status == 403
        a.vm("create", "tls1", "--memory", "128M")
        a.vm("start", "tls1")
        assert "ticks: " in a.shell("tls1", "ticks", b"ticks: ")
        out = a.vm("migrate", "tls1", "--to", b.address, "--token-file", str(b.token_file))
        assert f"tls1 runs on {b.address} now" in out, out
        assert b.state_of("tls1") == "running" and "tls1" not in a.names()
        assert "ticks: " in b.shell("tls1", "ticks", b"ticks: ")  # its console answers at B
        # and B's admin, over TLS with a client certificate, sees it
        assert [vm["name"] for vm in b.tcp_client().request("GET", "/api/vms")["vms"]] == ["tls1"]
        b.vm("stop", "tls1")


def test_pyhv_vm_migrate_postcopy_runs_the_vm_at_the_destination_and_reports_blocktime(
    hosts: tuple[VmmsProcess, VmmsProcess],
) -> None:
    a, b = hosts
    _start_dirtying(a, "pc", "128M", 8)
    # the option passes through the VMMS to the source worker
    out = a.vm("migrate", "pc", "--to", b.address, "--token-file", str(b.token_file), "--postcopy")
    assert "post-copy (post-copy asked for at once)" in out and "blocktime p50" in out, out
    assert f"pc runs on {b.address} now" in out, out
    assert "pc" not in a.names()
    written = touched(b, "pc")
    wait_for(lambda: touched(b, "pc") > written, 60, "the dirty task writing on B")
    b.vm("stop", "pc")


def test_a_post_copy_between_two_vmms_recovers_from_a_cut_link(
    hosts: tuple[VmmsProcess, VmmsProcess],
) -> None:
    import subprocess

    a, b = hosts
    _start_dirtying(a, "pcr", "128M", 16)
    rec = a.client.request(
        "POST",
        "/api/vms/pcr/migrate",
        {
            "destination": b.address,
            "token": b.token_file.read_text().strip(),
            # a slow link: the push takes seconds after the VM runs at B
            "options": {"postcopy": True, "bandwidth": 2 * MIB},
        },
    )

    def source_port() -> int | None:
        for r in b.client.request("GET", "/api/migrations")["migrations"]:
            if r["direction"] == "incoming" and r["vm"] == "pcr" and ":" in r["peer"]:
                return int(r["peer"].rpartition(":")[2])  # known once the VM runs at B
        return None

    port = wait_for(source_port, 60, "the VM running at B")
    # the link cut: the source worker's socket destroyed (the kernel resets B's end)
    cut = subprocess.run(
        ["ss", "-K", "-tn", "dst", "127.0.0.1", "sport", "=", f":{port}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert cut.returncode == 0 and f":{port}" in cut.stdout, (cut.stdout, cut.stderr)

    def ended() -> dict[str, Any] | None:
        r: dict[str, Any] = a.client.request("GET", f"/api/migrations/{rec['id']}")
        return r if r["state"] in ("done", "failed", "in-doubt") else None

    final = wait_for(ended, 120, "the migration ending")
    assert final["state"] == "done", final
    pc = final["result"]["postcopy"]
    assert pc["recoveries"] == 1, pc
    assert pc["checksum_destination"] == pc["checksum_source"]
    assert "pcr" not in a.names()
    written = touched(b, "pcr")
    wait_for(lambda: touched(b, "pcr") > written, 60, "the dirty task writing on B")
    b.vm("stop", "pcr")
