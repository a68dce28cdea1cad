"""Each VM's worker runs in a jail of its own (pyhv.worker.jail) when the VMMS runs as root:
its own uid, no_new_privs, seccomp, its own mount/pid/network namespaces, and a memory cgroup
whose limit follows the VM's assigned memory. Code running as that worker, in its namespaces,
finds neither the VMMS's socket nor its API token nor another VM's processes. `--no-jail`
still works and says so."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.vmms.vmms_process import ROOT, VmmsCli

pytestmark = pytest.mark.guest

MIB = 1 << 20
OVERHEAD = 96 * MIB  # the VMMS's default --worker-overhead


def _serve(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Path, Path]:
    state, log = tmp / "state", tmp / "vmms.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhv.cli", "vmms", "serve", "--state-dir", str(state)]
        + ["--memory-budget", "3G", "--host-reserve", "256M", "--stop-vms-on-exit", *extra],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    for _ in range(600):
        if (state / "vmms.sock").exists():
            break
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    return proc, state, log


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def jailed(tmp_path: Path) -> Iterator[tuple[VmmsCli, Path]]:
    if os.geteuid() != 0:
        pytest.fail("the jail needs root: run this test as root")
    proc, state, log = _serve(tmp_path)
    try:
        yield VmmsCli(state), log
    finally:
        _stop(proc)


def _status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _cgroup_dir(pid: int) -> Path:
    """The v1 memory cgroup directory of process `pid` (this machine's hierarchy)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path(f"/sys/fs/cgroup/memory{path}")
    raise AssertionError(f"no v1 memory cgroup for pid {pid}: this test reads v1's files")


def _cgroup_limit(pid: int) -> int:
    """The memory cgroup limit of process `pid`, read from the kernel's files."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return int(Path(f"/sys/fs/cgroup/memory{path}/memory.limit_in_bytes").read_text())
        if controllers == "" and Path("/sys/fs/cgroup/cgroup.controllers").exists():
            raw = Path(f"/sys/fs/cgroup{path}/memory.max").read_text().strip()
            if raw != "max":
                return int(raw)
    raise AssertionError(f"no memory cgroup for pid {pid}")


def _wait_limit(host: VmmsCli, name: str, pid: int, want: int) -> None:
    for _ in range(600):
        if _cgroup_limit(pid) == want:
            break
        time.sleep(0.1)
    assert _cgroup_limit(pid) == want, host.show(name)
    assert host.show(name)["enforcement"]["cgroup_limit"] == want


def test_a_jailed_worker_runs_as_its_own_uid_confined_in_namespaces_with_a_cgroup_that_follows_its_memory(
    jailed: tuple[VmmsCli, Path],
) -> None:
    host, _ = jailed
    host.vm("create", "dm", "--memory", "512M", "--dynamic", "--minimum", "256M", "--maximum", "1G")
    host.vm("start", "dm")
    # The guest runs: the worker has confined itself (before the guest's first instruction).
    assert b"pyhv> " in host.console_until("dm", "mem", b"hot-added")
    shown = host.show("dm")
    pid, uid = shown["pid"], shown["jail_uid"]
    assert isinstance(pid, int) and uid >= 100000
    st = _status(pid)
    assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split()[0] == str(uid)
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
    assert st["CapEff"] == st["CapPrm"] == st["CapBnd"] == "0000000000000000"
    for ns in ("mnt", "pid", "net"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert st["NSpid"].split()[-1] == "1"  # pid 1 of a pid namespace of its own
    assert f"worker pid {pid} (jailed as uid {uid})" in host.vm("show", "dm")

    # The cgroup's limit is the assigned memory + the overhead, and follows a balloon and an add.
    _wait_limit(host, "dm", pid, 512 * MIB + OVERHEAD)
    host.wait_for_dm_report("dm")
    host.vm("memory", "dm", "--target", "384M")
    _wait_limit(host, "dm", pid, 384 * MIB + OVERHEAD)
    host.vm("memory", "dm", "--target", "768M")
    _wait_limit(host, "dm", pid, 768 * MIB + OVERHEAD)
    assert b"visible: 768 MiB" in host.console_until("dm", "mem", b"ballooned")


PROBE = """
import os, socket, sys
state, other = sys.argv[1], int(sys.argv[2])
found = []
for path in (state + "/vmms.sock", state + "/token", f"/proc/{other}/mem", "/etc/passwd"):
    try:
        open(path, "rb").close()
        found.append(path)
    except OSError:
        pass
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(state + "/vmms.sock")
    found.append("connected to vmms.sock")
except OSError:
    pass
print("found", found, "procs", sorted(p for p in os.listdir("/proc") if p.isdigit()))
"""


def test_code_running_as_a_worker_reaches_neither_the_vmms_nor_its_token_nor_another_vm(
    tmp_path: Path,
) -> None:
    # Serving TCP (so with an API token, and workers that may migrate share the network).
    proc, state, _ = _serve(tmp_path, "--tcp", "127.0.0.1:0")
    try:
        _probe(VmmsCli(state))
    finally:
        _stop(proc)


def _probe(host: VmmsCli) -> None:
    for name in ("one", "two"):
        host.vm("create", name, "--memory", "128M")
        host.vm("start", name)
    one, two = host.show("one"), host.show("two")
    assert one["jail_uid"] != two["jail_uid"]
    assert (host.state / "token").exists() and (host.state / "vmms.sock").exists()
    # A process in worker one's namespaces, as its uid (what an escape into it would have).
    probe = subprocess.run(
        ["nsenter", "-t", str(one["pid"]), "-m", "-p", "-n", "-i", "-u"]
        + ["-S", str(one["jail_uid"]), "-G", str(one["jail_uid"])]
        + [sys.executable, "-c", PROBE, str(host.state), str(two["pid"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert "found [] procs ['1', " in probe.stdout, probe.stdout
    assert str(two["pid"]) not in probe.stdout.partition("procs")[2]
    # Worker two's memory is not its uid's, even through the host's /proc.
    for fd in os.listdir(f"/proc/{two['pid']}/fd"):
        target = os.readlink(f"/proc/{two['pid']}/fd/{fd}")
        if target.startswith("/memfd:"):
            assert os.stat(f"/proc/{two['pid']}/fd/{fd}").st_uid == two["jail_uid"]


def test_no_jail_runs_the_worker_unconfined_and_says_so(tmp_path: Path) -> None:
    proc, state, log = _serve(tmp_path, "--no-jail")
    try:
        host = VmmsCli(state)
        host.vm("create", "free", "--memory", "128M")
        host.vm("start", "free")
        shown = host.show("free")
        st = _status(shown["pid"])
        assert st["Seccomp"] == "0" and st["Uid"].split()[0] == str(os.geteuid())
        assert "enforcement" in shown and shown["enforcement"]["cgroup_limit"] is None
        # the guest answers (console_until returns at the marker: a prompt after it may not
        # have arrived yet)
        assert b"visible: 128 MiB" in host.console_until("free", "mem", b"hot-added")
        assert "WORKERS RUN WITHOUT A JAIL" in log.read_text()
    finally:
        _stop(proc)


def _wait(
    what: str,
    check: Callable[[], object],
    timeout: float = 60,
    explain: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what} {explain()}")


def _mem(out: bytes, what: str) -> int:
    """A figure of the guest's `mem` (MiB)."""
    m = re.search(what.encode() + rb": (\d+) MiB", out)
    return -1 if m is None else int(m[1])


def _touched_all(tasks: bytes, mib: int = 480) -> bool:
    """The testlimit task holds its `mib` MiB and has written each page at least once (its
    count includes rewrites; a first pass over the allocation is 256 writes a MiB)."""
    m = re.search(rb"allocated (\d+) MiB, touched (\d+) pages", tasks)
    return m is not None and int(m[1]) == mib and int(m[2]) >= mib * 256


def _use(host: VmmsCli, name: str, mib: int) -> None:
    """The guest's testlimit commits `mib` MiB and writes all of it (bounded wait)."""
    host.console_until(name, f"testlimit -m {mib}", b"pyhv> ")
    _wait(
        f"{mib} MiB allocated and touched",
        lambda: _touched_all(host.console_until(name, "tasks", b"passes"), mib),
        timeout=120,
    )


def test_a_guest_rewriting_ballooned_pages_is_reported_then_stopped_at_its_limit_alone(
    jailed: tuple[VmmsCli, Path],
) -> None:
    host, _ = jailed
    host.vm("create", "good", "--memory", "128M")
    host.vm("start", "good")
    # Buffer 5 %: the guest's demand below (about 230 MiB) keeps the balancer's target at the
    # 256M minimum, so the balloon stays where the test puts it.
    host.vm(
        "create", "bad", "--memory", "512M", "--dynamic", "--minimum", "256M", "--maximum", "512M",
        "--buffer", "5",
    )  # fmt: skip
    host.vm("start", "bad")
    host.wait_for_dm_report("bad")
    # The guest touches nearly all its RAM, then lets it go (still backed on the host).
    host.console_until("bad", "testlimit -m 480", b"pyhv> ")
    _wait(
        "480 MiB allocated and touched",
        lambda: _touched_all(host.console_until("bad", "tasks", b"passes")),
        timeout=120,
    )
    host.console_until("bad", "free", b"pyhv> ")
    _wait("freed", lambda: _mem(host.console_until("bad", "mem", b"ballooned"), "free") >= 480)
    # The balancer acts on the latest report: until one shows the memory freed, a tick would
    # add it back (the VM looks short) and replace the target below.
    _wait(
        "a status report with the memory freed",
        lambda: (host.show("bad")["memory"].get("demand") or 1 << 40) < 256 * MIB,
    )
    host.vm("memory", "bad", "--target", "256M")
    pid = host.show("bad")["pid"]
    _wait(
        "ballooned to 256M",
        lambda: host.show("bad")["memory"]["assigned"] == 256 * MIB,
        explain=lambda: host.show("bad"),
    )
    _wait_limit(host, "bad", pid, 256 * MIB + OVERHEAD)

    # Free-page hints leave the guest's free memory unbacked on the host (its memfd is sparse):
    # re-touched ballooned pages show in the kernel's total only once it passes the claim. So
    # the guest first uses its own memory (120 MiB more), as a busy guest would.
    before = host.show("bad")["enforcement"]["kernel_ram"] or 0
    _use(host, "bad", 120)
    _wait(
        "the kernel's figure taking the guest's used memory in",
        lambda: (host.show("bad")["enforcement"]["kernel_ram"] or 0) >= before + 32 * MIB,
        explain=lambda: host.show("bad"),
    )
    assert host.show("bad")["memory"]["assigned"] == 256 * MIB  # the balloon stays
    kernel = host.show("bad")["enforcement"]["kernel_ram"]

    # Within the overhead: re-touched ballooned pages take the kernel's figure 16 MiB past the
    # claim (well inside the 96 MiB overhead); reported, counted, and the pool takes the
    # kernel's figure.
    retouch = (256 * MIB + 16 * MIB - kernel) // MIB
    assert 16 <= retouch <= 192, kernel  # ballooned: 256 MiB
    wrote = b"wrote %d ballooned pages" % (retouch * 256)
    assert wrote in host.console_until("bad", f"retouch {retouch}", b"MiB)")
    _wait(
        "the disagreement reported",
        lambda: host.show("bad")["enforcement"]["claims_disagreements"] >= 1,
        explain=lambda: host.show("bad"),
    )
    shown = host.show("bad")
    kernel = shown["enforcement"]["kernel_ram"]
    assert kernel > 256 * MIB and shown["memory"]["assigned"] == kernel
    assert "claims 256 MiB assigned" in shown["enforcement"]["last_disagreement"]
    assert "claims disagreed" in host.vm("show", "bad")

    # Beyond it: the kernel stops this worker at its limit; the VMMS says why; the other VM runs.
    # (The peak since now: v1's max_usage_in_bytes restarts when written.)
    (_cgroup_dir(pid) / "memory.max_usage_in_bytes").write_text("0")
    with host.client.console("bad") as sock:
        sock.sendall(b"retouch 256\r")
    _wait("bad stopped", lambda: host.show("bad")["state"] == "crashed", timeout=120)
    reason = host.show("bad")["reason"]
    assert "memory cgroup's limit" in reason and str(256 * MIB + OVERHEAD) in reason, reason
    peak = int(reason.split("peak ")[1].split(")")[0])
    assert peak <= 256 * MIB + OVERHEAD
    counters = host.client.request("GET", "/api/counters")
    assert "Memory Limit Kills" in str(counters), counters
    assert host.show("good")["state"] == "running"
    assert b"visible: 128 MiB" in host.console_until("good", "mem", b"ballooned")


def test_a_jailed_huge_pages_vm_gets_its_tmpfs_from_the_vmms_and_the_claims_count_it(
    jailed: tuple[VmmsCli, Path],
) -> None:
    """The jailed worker cannot mount the private tmpfs of RAM in 2 MiB pages: the VMMS mounts
    it (owned by the worker's uid) and the worker inherits its fd; the claims check and the
    cgroup count those files' pages, and memory the guest frees leaves the host."""
    host, _ = jailed
    host.vm(
        "create", "big", "--memory", "512M", "--dynamic", "--minimum", "256M", "--maximum",
        "512M", "--huge-pages",
    )  # fmt: skip
    host.vm("start", "big")
    host.wait_for_dm_report("big")
    pid = host.show("big")["pid"]
    assert _status(pid)["Seccomp"] == "2"
    links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    ram = [link for link in links if re.fullmatch(r"/#\d+ \(deleted\)", link)]
    assert ram and not any(link.startswith("/memfd:") for link in links), links
    _use(host, "big", 256)
    _wait(
        "the kernel's figure (the tmpfs files' blocks) taking the guest's memory in",
        lambda: (host.show("big")["enforcement"]["kernel_ram"] or 0) >= 256 * MIB,
        explain=lambda: host.show("big"),
    )
    usage = int((_cgroup_dir(pid) / "memory.usage_in_bytes").read_text())
    assert usage >= 256 * MIB  # charged to the worker's cgroup, not the VMMS's
    held = host.show("big")["enforcement"]["kernel_ram"]
    host.console_until("big", "free", b"pyhv> ")
    _wait(
        "the freed memory off the host (hinted, discarded)",
        lambda: host.show("big")["enforcement"]["kernel_ram"] <= held - 200 * MIB,
        explain=lambda: host.show("big"),
    )
    assert host.show("big")["enforcement"]["claims_disagreements"] == 0
    assert b"visible: 512 MiB" in host.console_until("big", "mem", b"ballooned")


@pytest.mark.parametrize("huge_pages", [False, True], ids=["4k-memfd", "2m-huge-pages"])
def test_a_vm_migrated_in_runs_in_a_jail_at_the_destination(
    tmp_path: Path, huge_pages: bool
) -> None:
    from tests.vmms.vmms_process import vmms_pair

    with vmms_pair(tmp_path) as (a, b):
        a.vm("create", "mover", "--memory", "256M", *(["--huge-pages"] if huge_pages else []))
        a.vm("start", "mover")
        a.vm("migrate", "mover", "--to", b.address, "--token-file", str(b.token_file))
        shown = b.client.request("GET", "/api/vms/mover")
        assert shown["state"] == "running"
        st = _status(shown["pid"])
        assert st["Uid"].split()[0] == str(shown["jail_uid"]) != "0"
        assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"
        assert os.readlink(f"/proc/{shown['pid']}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert shown["enforcement"]["cgroup_limit"] >= 256 * MIB + OVERHEAD
        assert "pyhv> " in b.shell("mover", "mem")
        # its RAM in the destination VMMS's tmpfs for it, or in memfds
        fds = f"/proc/{shown['pid']}/fd"
        links = [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
        tmpfs = [link for link in links if re.fullmatch(r"/#\d+ \(deleted\)", link)]
        assert bool(tmpfs) == huge_pages and any(link.startswith("/memfd:") for link in links) != (
            huge_pages
        ), links
        assert b.client.request("GET", "/api/vms/mover")["settings"]["huge_pages"] is huge_pages
