"""A memory cgroup per worker: the kernel's bound on what a VM's worker process may hold
(guest RAM plus the worker's own overhead), whatever the worker claims.

One small class over both hierarchies: cgroup v1 (``memory.limit_in_bytes``,
``memory.usage_in_bytes``, ``oom_kill`` in ``memory.oom_control``; this machine mounts the
memory controller so) and cgroup v2 (``memory.max``, ``memory.current``, ``oom_kill`` in
``memory.events``; most current distributions). Groups are made under the VMMS's own memory
cgroup (so a VMMS inside a container or a systemd unit stays inside it), in ``pyhv-workers/``.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


class CgroupError(OSError):
    """The memory cgroup could not be made, limited or joined (the message says which)."""


def _own_paths(proc_cgroup: str) -> tuple[str | None, str | None]:
    """(v1 memory path, v2 path) of this process, from /proc/self/cgroup's text."""
    v1 = v2 = None
    for line in proc_cgroup.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def memory_hierarchy(root: Path = CGROUP_ROOT) -> tuple[int, Path]:
    """(1 or 2, the directory new groups go under): v1 where a memory controller is mounted at
    ROOT/memory, else v2 where ROOT's cgroup.controllers lists memory. CgroupError if neither."""
    v1_path, v2_path = _own_paths(Path("/proc/self/cgroup").read_text())
    if (root / "memory" / "memory.limit_in_bytes").exists():
        return 1, root / "memory" / (v1_path or "/").lstrip("/") / "pyhv-workers"
    controllers = root / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        # v2 puts no process in an inner node: the workers' parent is a sibling of our group.
        own = root / (v2_path or "/").lstrip("/")
        return 2, (own.parent if own != root else root) / "pyhv-workers"
    raise CgroupError(
        errno.ENOENT,
        f"no memory cgroup controller under {root} (neither v1 {root}/memory nor v2 "
        f"cgroup.controllers with 'memory'): mount one, or run the VMMS with --no-jail",
    )


class MemoryCgroup:
    """One worker's memory cgroup: made by `create`, limited by `set_limit`, joined by `add`,
    read by `usage`/`limit`/`oom_kills`, removed by `remove` once the worker has exited."""

    def __init__(self, path: Path, version: int) -> None:
        self.path = path
        self.version = version
        v1 = version == 1
        self._max = "memory.limit_in_bytes" if v1 else "memory.max"
        self._current = "memory.usage_in_bytes" if v1 else "memory.current"
        self._events = "memory.oom_control" if v1 else "memory.events"

    @classmethod
    def create(cls, name: str, limit_bytes: int, root: Path = CGROUP_ROOT) -> MemoryCgroup:
        version, parent = memory_hierarchy(root)
        try:
            parent.mkdir(exist_ok=True)
            if version == 2:  # let the children have a memory controller
                with contextlib.suppress(OSError):
                    (parent / "cgroup.subtree_control").write_text("+memory")
            path = parent / name
            if path.exists():
                cls(path, version).remove()  # left by a worker of an earlier VMMS
            path.mkdir()
        except OSError as e:
            raise CgroupError(
                e.errno, f"cannot make the memory cgroup {parent / name}: {e}"
            ) from None
        group = cls(path, version)
        group.set_limit(limit_bytes)
        return group

    def set_limit(self, limit_bytes: int) -> None:
        """Set the hard limit. CgroupError when the kernel refuses (v1 refuses a limit below
        what the group holds, EBUSY; the old limit stands)."""
        try:
            (self.path / self._max).write_text(str(limit_bytes))
        except OSError as e:
            raise CgroupError(
                e.errno, f"{self.path / self._max} <- {limit_bytes}: {os.strerror(e.errno or 0)}"
            ) from None

    def limit(self) -> int:
        raw = (self.path / self._max).read_text().strip()
        return (1 << 63) - 1 if raw == "max" else int(raw)

    def usage(self) -> int:
        """Bytes the kernel charges to the group now (the worker's memfds, heap, page cache)."""
        return int((self.path / self._current).read_text())

    def peak(self) -> int | None:
        """The most the group has held (v1 max_usage_in_bytes, v2 memory.peak where the kernel
        has it), None if unknown."""
        try:
            name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        """How many processes of the group the kernel's OOM killer has killed (the limit was
        reached and nothing could be reclaimed)."""
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / self._events).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return 0

    def add(self, pid: int) -> None:
        """Move process `pid` into the group (what it allocates from now on is charged here)."""
        try:
            (self.path / "cgroup.procs").write_text(str(pid))
        except OSError as e:
            raise CgroupError(e.errno, f"cannot move pid {pid} into {self.path}: {e}") from None

    def remove(self) -> None:
        """Remove the group (its processes have exited); an error is ignored (a later create
        of the same name removes it then)."""
        with contextlib.suppress(OSError):
            self.path.rmdir()
