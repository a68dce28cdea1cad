"""Several virtual processors that run guest code: the reference guest's CPU 0 starts the others
with INIT and STARTUP IPIs through KVM's in-kernel LAPIC (a real-mode trampoline that goes
straight to long mode, docs/boot-protocol.md), each with its own timer, and its tasks run on every
CPU. Checked from both sides: the guest's `cpus` (ticks and
task runs per CPU) and KVM's own per-vCPU exit counts; then pause/resume, Dynamic Memory and a
live migration with two VPs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyhv.guest_image import image_path
from pyhv.hypervisor.intercepts import InterceptKind
from tests.guest.shell import Shell
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]


def cpus(shell: Shell) -> dict[int, dict[str, Any]]:
    """`cpus` as {cpu: {ticks, runs, now}}."""
    out = shell.run("cpus")
    rows = re.findall(r"^cpu (\d+): ticks (\d+), task runs (\d+), (.*)$", out, re.M)
    return {int(c): {"ticks": int(t), "runs": int(r), "now": now} for c, t, r, now in rows}


def ticks_rise_on_every_cpu(shell: Shell, n: int) -> None:
    first = cpus(shell)
    assert sorted(first) == list(range(n)), first
    wait_for(
        lambda: all(c["ticks"] > first[i]["ticks"] for i, c in cpus(shell).items()),
        30,
        "every CPU's timer ticks",
    )


@pytest.fixture
def boot_vps(boot_guest: Callable[..., Shell]) -> Callable[..., Shell]:
    return lambda vps=2, **kw: boot_guest(vps=vps, **kw)


# KVM_RUN of a VP that took INIT/SIPI fails once with EAGAIN: both run loops run it again
@pytest.mark.parametrize("loop", ["c", "python"])
def test_pyhv_run_with_two_vps_shows_two_cpus_online(loop: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pyhv.cli", "run", "--vps", "2"]
        + ["--command", "cpus", "--command", "poweroff"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=os.environ | {"PYHV_NO_FASTRUN": "1" if loop == "python" else ""},
    )
    assert r.returncode == 0, r.stderr
    assert "cpus: 2 online of 2 VPs" in r.stdout
    assert re.search(r"^cpu 1: ticks \d+, task runs 0, idle$", r.stdout, re.M), r.stdout


def test_both_vps_execute_guest_code_and_tasks_run_on_cpu_1(boot_vps: Any) -> None:
    shell = boot_vps(2)
    assert "2 VP, 2 CPU online" in shell.banner
    # KVM's own per-vCPU statistics: opened while the VPs are paused (the ioctl waits for the
    # vCPU's lock, which KVM_RUN holds)
    p = shell.vm.partition
    p.pause()
    stats = [vp.vcpu.open_stats() for vp in shell.vm.vps]
    p.resume()
    try:
        before = [s.read()["exits"] for s in stats]
        out = shell.run("dirty 4 -p")
        assert "task 0 rewrites 4 MiB as fast as it can on cpu 0" in out
        assert "task 1 rewrites 4 MiB as fast as it can on cpu 1" in out
        wait_for(
            lambda: (
                re.search(
                    r"task 1: dirty .*touched (\d+) pages.*cpu 1 \(pinned\)",
                    t := shell.run("tasks"),
                )
                and int(re.search(r"task 1: .*touched (\d+)", t)[1]) >= 4 * 256
            ),
            30,
            "task 1 runs on cpu 1 and has written its 4 MiB",
        )
        # (between two entries into its task, at each tick, a CPU is briefly in its kernel)
        wait_for(
            lambda: (c := cpus(shell)[1])["runs"] > 0 and c["now"] == "running task 1 (dirty)",
            30,
            "`cpus` shows cpu 1 running task 1",
        )
        ticks_rise_on_every_cpu(shell, 2)
        wait_for(
            lambda: all(s.read()["exits"] > b for s, b in zip(stats, before, strict=True)),
            30,
            "both vCPUs' exit counts rise",
        )
        # a task another CPU runs is killed and released; the memory manager is consistent
        assert "task 1 (dirty) killed: 4 MiB released" in shell.run("kill 1")
        assert "pmm: consistent" in shell.run("pmmcheck")
        assert cpus(shell)[1]["now"] == "idle"
    finally:
        for s in stats:
            s.close()


def test_an_intercept_from_vp_1_is_handled_like_one_from_vp_0(boot_vps: Any) -> None:
    """A task faulting on CPU 1 has CPU 1 print the report: its COM1 writes are VP 1's I/O
    intercepts, handled by the worker's UART like VP 0's."""
    shell = boot_vps(2)
    vp0, vp1 = shell.vm.vps
    before = vp1.counts[int(InterceptKind.IO_PORT)]
    assert "fault: task 0 reads 1000000000 at CPL3 on cpu 1" in shell.run("fault user 1")
    wait_for(lambda: shell.run("tasks") == "no tasks\n", 30, "the task is gone")
    assert re.search(
        r"task 0 \(fault\) on cpu 1: exception 14 \(page fault\) .*cr2 1000000000, error code 4: "
        r"task killed",
        shell.vm.serial.text,
    )
    assert vp1.counts[int(InterceptKind.IO_PORT)] > before + 60  # one OUT per character at least
    assert vp0.counts[int(InterceptKind.IO_PORT)] > 0
    assert "fault: usage" in shell.run("fault user 2")  # no such CPU online
    ticks_rise_on_every_cpu(shell, 2)


def test_testlimit_per_cpu_commits_on_every_cpu_and_frees_it_all(boot_vps: Any) -> None:
    shell = boot_vps(3)
    assert sorted(cpus(shell)) == [0, 1, 2]
    before = shell.values("mem")
    out = shell.run("testlimit -m 8 -c 2 -p")
    assert len(re.findall(r"committed 16 MiB \(2 x 8 MiB\)", out)) == 3, out
    assert shell.values("mem")["committed"] == before["committed"] + 48
    for cpu in (1, 2):
        wait_for(
            lambda cpu=cpu: (
                re.search(
                    rf"testlimit .*touched (\d+) pages.*cpu {cpu} \(pinned\)",
                    t := shell.run("tasks"),
                )
                and int(re.search(rf"touched (\d+) pages, passes \d+, cpu {cpu} ", t)[1])
                >= 16 * 256
            ),
            30,
            f"the testlimit task on cpu {cpu} touched its 16 MiB",
        )
    assert shell.run("free").count("killed") == 3
    assert shell.values("mem") == before
    assert "pmm: consistent" in shell.run("pmmcheck")


def test_two_vps_pause_and_resume_together(boot_vps: Any) -> None:
    shell = boot_vps(2)
    shell.run("dirty 2 -p")
    p = shell.vm.partition
    p.pause()
    p.resume()
    ticks_rise_on_every_cpu(shell, 2)
    assert cpus(shell)[1]["runs"] > 0


def test_the_dm_vsc_negotiates_and_reports_with_two_vps(boot_vps: Any) -> None:
    shell = boot_vps(2, dynamic_memory=True, minimum="64M", maximum="1G")
    vm = shell.vm
    wait_for(lambda: vm.dynmem.negotiated, 30, "the host saw the negotiation")
    first = wait_for(
        lambda: (st := vm.memory_status()).get("committed_pages") and st,
        30,
        "a first status report",
    )
    shell.run("testlimit -m 32 -p")  # commit moves on both CPUs; the VSC reports it
    wait_for(
        lambda: vm.memory_status().get("committed_pages", 0) >= first["committed_pages"] + 64 * 256,
        30,
        "a status report with the 64 MiB committed",
    )
    assert "state: ready" in shell.run("dm")
    # the status the worker pushes carries every VP's intercept counters
    assert [v.vp for v in vm.dynmem.memory_status().vps] == [0, 1]
    # the VSC balloons and unballoons on CPU 0 while tasks on both CPUs hold and rewrite memory:
    # one memory manager, consistent after
    shell.run("dirty 16 -p")
    vm.set_memory_target(160 << 20)
    assert vm.wait_memory_idle(60)
    assert shell.values("mem")["ballooned"] > 0
    vm.set_memory_target(256 << 20)
    assert vm.wait_memory_idle(60)
    wait_for(
        lambda: (
            len(re.findall(r"dirty committed 16 MiB, allocated 16 MiB", shell.run("tasks"))) == 2
        ),
        30,
        "both dirty tasks hold their 16 MiB",
    )
    assert "pmm: consistent" in shell.run("pmmcheck")
    ticks_rise_on_every_cpu(shell, 2)


def test_a_two_vp_vm_dirtying_on_both_cpus_migrates_and_both_run_there() -> None:
    from pyhv.migration.worker import IncomingWorker, migrate_worker
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess
    from tests.migration.conftest import TOKEN, Guest, moved

    src = WorkerProcess(VmConfig.create(image=image_path(), memory="128M", vps=2))
    dst = IncomingWorker(TOKEN, accept_timeout=60.0, timeout=20.0)
    try:
        src.start()
        guest = Guest(src)
        guest.run("dirty 8 -p")
        guest.wait_working_set(8, task=0)
        guest.wait_working_set(8, task=1)
        dst.start()
        migrate_worker(src, dst.wait_listening(), TOKEN, {"verify": True})
        assert dst.wait_migrated(30) is not None
        end = src.wait(30)
        assert end is not None and "migrated to" in end.detail
        there = moved(dst)
        assert cpus(there)[1]["runs"] > 0
        ticks_rise_on_every_cpu(there, 2)
        first = there.touched(task=1)
        wait_for(lambda: there.touched(task=1) > first, 30, "the task on cpu 1 keeps dirtying")
    finally:
        src.close()
        dst.close()
