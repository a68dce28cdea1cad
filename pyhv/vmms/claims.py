"""Memory the host enforces: each worker's memory cgroup limit kept at what its VM is assigned
plus a stated overhead, and each worker's claims checked against the kernel's own figures.

A worker is not trusted to report its own memory (a guest that escaped into it controls what it
pushes). Two kernel figures stand against its claim:

- the blocks of its memfds (``st_blocks`` of each ``/memfd:...`` the worker holds open, read
  through ``/proc/PID/fd``): the host pages behind the guest's RAM, exactly (every memfd counts:
  the names are the worker's to choose); with ``huge_pages``, the unnamed files on its private
  tmpfs (pyhv.memory.hugeram), which /proc shows as ``/#INODE (deleted)``;
- its memory cgroup's usage (everything charged to it), bounded by the limit.

The limit follows the assigned memory: raised *before* a target above the current assignment is
sent (so a hot-add or an unballoon never runs into it), lowered when a status shows the memory
given up (a balloon has punched its pages out by then). A guest that writes to pages it
ballooned out gets them backed again by the kernel: the memfd blocks then exceed the claim (the
VMMS reports the disagreement and counts the larger figure in the pool), and the cgroup stops it
at assigned + overhead: the kernel's OOM killer ends that worker only, and the VMMS reports why.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass

from pyhv.memory.manager import PAGE_SIZE
from pyhv.vmms.cgroup import CgroupError, MemoryCgroup

log = logging.getLogger(__name__)

#: How /proc shows a memfd (then its name, chosen by the worker).
MEMFD = "/memfd:"
#: How /proc shows an unnamed file (O_TMPFILE) at the root of a mount no path leads to: the
#: guest RAM of a huge_pages VM.
TMPFILE = re.compile(r"/#\d+ \(deleted\)")

#: Pages the kernel may hold beyond a worker's claim before the claim is called wrong (a status
#: and the punch or the touch it reports are not one instant).
TOLERANCE_PAGES = 256


def memfd_pages(pid: int) -> int:
    """Host pages behind process `pid`'s memfds, its guest RAM (each counted once however many
    fds it has open). OSError when the process is gone."""
    base = f"/proc/{pid}/fd"
    seen: set[tuple[int, int]] = set()
    total = 0
    for fd in os.listdir(base):
        try:
            link = os.readlink(f"{base}/{fd}")
            if not link.startswith(MEMFD) and not TMPFILE.fullmatch(link):
                continue
            st = os.stat(f"{base}/{fd}")
        except OSError:
            continue  # closed meanwhile
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total // PAGE_SIZE


@dataclass
class Disagreement:
    """A worker claimed fewer assigned pages than the kernel holds for it."""

    claimed_pages: int
    kernel_pages: int

    def describe(self) -> str:
        return (
            f"the worker claims {self.claimed_pages * PAGE_SIZE >> 20} MiB assigned, the kernel "
            f"holds {self.kernel_pages * PAGE_SIZE >> 20} MiB in its guest RAM (ballooned pages "
            "backed again: a guest re-touching them, or a worker that misreports)"
        )


class WorkerMemory:
    """One running VM's enforced memory: its worker's pid, its cgroup (None without a jail),
    and what the kernel was last seen holding."""

    def __init__(self, name: str, pid: int | None, cgroup: MemoryCgroup | None, overhead: int):
        self.name = name
        self.pid = pid
        self.cgroup = cgroup
        self.overhead = overhead
        self.kernel_pages: int | None = None
        self.disagreements = 0
        self.last_disagreement: Disagreement | None = None
        self._raised_to = 0  # pages a target in flight may reach
        self._lock = threading.Lock()

    # --- the cgroup's limit ---------------------------------------------------------------

    def before_target(self, target_pages: int, assigned_pages: int) -> None:
        """A target is about to be sent: a raise goes to the cgroup first."""
        with self._lock:
            self._raised_to = max(target_pages, assigned_pages)
            self._set(self._raised_to)

    def after_status(self, assigned_pages: int, busy: bool) -> None:
        """A status arrived: the limit follows the assigned memory (or stays raised while an
        operation towards a higher target is in flight)."""
        with self._lock:
            if not busy:
                self._raised_to = 0
            self._set(max(assigned_pages, self._raised_to))

    def _set(self, pages: int) -> None:
        if self.cgroup is None:
            return
        try:
            self.cgroup.set_limit(pages * PAGE_SIZE + self.overhead)
        except CgroupError as e:  # v1: usage above the new limit (EBUSY); the old one stands
            log.warning("VM %s: memory cgroup limit not moved: %s", self.name, e)

    def limit(self) -> int | None:
        if self.cgroup is None:
            return None
        try:
            return self.cgroup.limit()
        except OSError:
            return None

    def usage(self) -> int | None:
        if self.cgroup is None:
            return None
        try:
            return self.cgroup.usage()
        except OSError:
            return None

    # --- claims ---------------------------------------------------------------------------

    def check(self, claimed_pages: int) -> Disagreement | None:
        """Read the kernel's figure; a Disagreement when it exceeds the claim (counted)."""
        if self.pid is None:
            return None
        try:
            kernel = memfd_pages(self.pid)
        except OSError:
            return None  # the worker has exited: its watcher reports that
        self.kernel_pages = kernel
        if kernel <= claimed_pages + TOLERANCE_PAGES:
            return None
        d = Disagreement(claimed_pages, kernel)
        self.disagreements += 1
        self.last_disagreement = d
        return d

    def oom_kills(self) -> int:
        return 0 if self.cgroup is None else self.cgroup.oom_kills()

    def describe(self) -> dict[str, object]:
        """For `pyhv vm show`: the kernel's figures beside the claims."""
        return {
            "kernel_ram": None if self.kernel_pages is None else self.kernel_pages * PAGE_SIZE,
            "cgroup_limit": self.limit(),
            "cgroup_usage": self.usage(),
            "overhead": self.overhead if self.cgroup is not None else None,
            "claims_disagreements": self.disagreements,
            "last_disagreement": (
                None if self.last_disagreement is None else self.last_disagreement.describe()
            ),
        }

    def close(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
