"""Killing a whole host the way a power cut does: every process of one VMMS host gets SIGKILL
at once, the VMMS and its workers (jailed workers run in sessions of their own, so the process
group does not find them: they are found as the VMMS's descendants, and by the state
directory on their command line)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # ended meanwhile
        ppid = int(stat.rpartition(")")[2].split()[1])
        out[int(entry)] = (ppid, cmdline.decode(errors="replace"))
    return out


def host_processes(vmms_pid: int, state_dir: Path) -> list[int]:
    """The VMMS `vmms_pid` and every process descending from it or naming `state_dir`."""
    procs = _processes()
    found = {vmms_pid}
    names = (f"{state_dir}/", f"{state_dir} ")  # its own directory, not a/ for ab/
    grew = True
    while grew:
        grew = False
        for pid, (ppid, cmdline) in procs.items():
            if pid not in found and (ppid in found or any(n in cmdline + " " for n in names)):
                found.add(pid)
                grew = True
    return sorted(found)


def kill_host(vmms_pid: int, state_dir: Path) -> list[int]:
    """SIGKILL every process of the host (the VMMS stopped first, so it starts no more while
    they are gathered); the pids killed."""
    os.kill(vmms_pid, signal.SIGSTOP)
    pids = host_processes(vmms_pid, state_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
