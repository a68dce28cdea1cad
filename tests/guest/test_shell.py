"""The reference guest boots under the worker to its shell, and the shell's commands drive the
physical memory manager and the background tasks that the Dynamic Memory story needs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pyhv.hypervisor import VirtualProcessor
from pyhv.kvm.constants import MP_STATE_HALTED
from tests.guest.shell import Shell
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

Boot = Callable[..., Shell]
IF = 1 << 9  # RFLAGS.IF: interrupts enabled


def run_until(shell: Shell, command: str, ok: Callable[[str], bool], timeout: float = 60) -> str:
    """Repeat a command until its output satisfies ok (the guest works in the background)."""
    seen: list[str] = []

    def satisfied() -> bool:
        seen.append(shell.run(command))
        return ok(seen[-1])

    try:
        wait_for(satisfied, timeout, f"{command!r} giving the expected output")
    except AssertionError as e:
        raise AssertionError(f"{e}; last output: {seen[-1]!r}") from None
    return seen[-1]


def test_the_guest_boots_to_a_banner_and_the_shell_prompt(boot_guest: Boot) -> None:
    shell = boot_guest("256M")
    assert shell.banner.startswith("pyhv guest: 256 MiB RAM")
    assert shell.banner.endswith("pyhv> ")


def test_mem_reports_each_counter_in_mib_one_per_line(boot_guest: Boot) -> None:
    shell = boot_guest("256M")
    out = shell.run("mem")
    assert [line.split(":")[0] for line in out.splitlines()] == [
        "visible",
        "free",
        "committed",
        "ballooned",
        "hot-added",
    ]
    m = shell.values("mem")
    assert m["visible"] == 256 and 250 <= m["free"] < 256
    assert m["ballooned"] == 0 and m["hot-added"] == 0
    assert 0 < m["committed"] < 8  # the kernel itself


def test_testlimit_commits_and_touches_memory_until_killed(boot_guest: Boot) -> None:
    shell = boot_guest("256M")
    before = shell.values("mem")
    assert "committed 64 MiB" in shell.run("testlimit -m 64 -c 1")
    during = shell.values("mem")
    assert during["committed"] == before["committed"] + 64
    assert during["free"] == before["free"] - 64
    run_until(shell, "tasks", lambda out: "touched 16384 pages" in out)  # one word per 4 KiB page
    assert "64 MiB released" in shell.run("kill")
    assert shell.values("mem") == before
    assert shell.run("pmmcheck") == "pmm: consistent\n"


def test_testlimit_can_commit_more_than_is_free_and_waits_for_memory(boot_guest: Boot) -> None:
    shell = boot_guest("128M")
    before = shell.values("mem")
    shell.run("testlimit -m 100 -c 2")
    m = shell.values("mem")
    assert m["committed"] == before["committed"] + 200 > m["visible"]
    assert m["free"] == 0
    assert f"allocated {before['free']} MiB" in shell.run("tasks")  # all there was, of 200
    assert "testlimit" in shell.run("free")
    assert shell.values("mem") == before


def test_ticks_rise_with_the_local_apic_timer(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    first = shell.values("ticks")["ticks"]
    run_until(shell, "ticks", lambda out: int(out.split()[1]) >= first + 10)


def test_dirty_rewrites_its_working_set_in_the_background_while_the_shell_answers(
    boot_guest: Boot,
) -> None:
    shell = boot_guest("128M")
    assert "rewrites 8 MiB" in shell.run("dirty 8")
    out = run_until(shell, "tasks", lambda out: "passes 0" not in out)
    assert "dirty committed 8 MiB, allocated 8 MiB" in out
    assert shell.values("mem")["committed"] >= 8
    assert "dirty" in shell.run("kill")
    assert shell.run("tasks") == "no tasks\n"


def test_dirty_keeps_to_the_rate_it_was_given(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    start = shell.values("ticks")["ticks"]  # read before: the task starts later
    shell.run("dirty 4 200")  # 2 pages per 10 ms tick
    run_until(shell, "ticks", lambda out: int(out.split()[1]) >= start + 30)  # 30 ticks on
    touched = int(shell.run("tasks").split("touched ")[1].split()[0])
    ticks = shell.values("ticks")["ticks"] - start  # read after: an upper bound on its ticks
    assert 0 < touched <= 2 * (ticks + 1)


def test_balloon_takes_pages_out_and_unballoon_gives_them_back(boot_guest: Boot) -> None:
    shell = boot_guest("256M")
    before = shell.values("mem")
    assert "(100 MiB) in 1 ranges" in shell.run("balloon 100")  # whole 2 MiB blocks, merged
    m = shell.values("mem")
    assert m["ballooned"] == 100 and m["free"] == before["free"] - 100
    assert m["visible"] == before["visible"]  # ballooning does not shrink visible memory
    assert shell.run("pmmcheck") == "pmm: consistent\n"
    assert "gave back 25600 pages" in shell.run("unballoon")
    assert shell.values("mem") == before


def test_the_balloon_stops_at_the_floor(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    out = shell.run("balloon 64")
    taken = int(out.split("(")[1].split()[0])
    assert 0 < taken < 64
    assert shell.values("mem")["free"] >= 40  # Linux's floor for 64 MiB: 8 + 64/2 MiB
    shell.run("unballoon")
    assert shell.run("pmmcheck") == "pmm: consistent\n"


def test_hot_added_memory_becomes_visible_and_free_once(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    before = shell.values("mem")
    assert "added 128 MiB at 8192 MiB" in shell.run("hotadd 8192 128")
    m = shell.values("mem")
    assert m["visible"] == before["visible"] + 128 and m["hot-added"] == 128
    assert m["free"] == before["free"] + 128
    assert "overlaps RAM" in shell.run("hotadd 8256 64")
    assert "overlaps RAM" in shell.run("hotadd 0 16")
    assert shell.values("mem") == m


def test_unknown_commands_and_bad_arguments_say_what_was_wrong(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    assert "unknown command 'frobnicate'" in shell.run("frobnicate")
    assert "-m must be a number of MiB" in shell.run("testlimit -m lots")
    assert "-m MB is required" in shell.run("testlimit -c 2")
    assert "usage dirty MB" in shell.run("dirty")
    assert "kill: no tasks" in shell.run("kill")
    assert "usage hotadd" in shell.run("hotadd 1")
    assert shell.run("") == ""  # an empty line just gives a new prompt


def test_backspace_edits_the_line_before_it_runs(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    assert shell.run("memx\x7f").startswith("visible: ")


def test_an_exception_in_a_task_kills_only_the_task(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    shell.run("fault user")
    run_until(shell, "tasks", lambda out: out == "no tasks\n")
    log = shell.vm.serial.text
    assert "exception 14 (page fault)" in log and "cr2 1000000000, error code 4: task killed" in log
    assert shell.values("mem")["visible"] == 64


def _halted_for_good(vp: VirtualProcessor, timeout: float = 10.0) -> bool:
    """Until the VP, paused to look, is in HLT (KVM's mp_state) with interrupts off (bounded)."""

    def halted() -> bool:
        vp.pause()
        try:
            return vp.vcpu.get_mp_state() == MP_STATE_HALTED and not vp.registers.rflags & IF
        finally:
            vp.resume()

    return wait_for(halted, timeout, "the VP in HLT with interrupts off", interval=0.01)


def test_a_kernel_exception_prints_vector_rip_cr2_and_error_code_then_halts(
    boot_guest: Boot,
) -> None:
    shell = boot_guest("64M")
    shell.vm.send(b"fault kernel\r")
    out = shell.vm.serial.read_until(b"halted", 30).decode()
    assert "kernel exception 14 (page fault) at rip " in out
    assert "cr2 1000000000, error code 0" in out
    # Halted for good, not powered off: VP 0 sleeps in HLT with interrupts off (nothing can
    # wake it), and the VM has not ended.
    assert _halted_for_good(shell.vm.partition.vps[0])
    assert shell.vm.wait(0) is None


def test_poweroff_ends_the_vm_with_the_status_given(boot_guest: Boot) -> None:
    shell = boot_guest("64M")
    shell.vm.send(b"poweroff 42\r")
    end = shell.vm.wait(30)
    assert end is not None and end.reason == "poweroff" and end.status == 42
