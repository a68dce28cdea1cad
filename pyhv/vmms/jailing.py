"""The VMMS's side of the worker jails (docs/security.md): which uid/gid each VM's worker runs
as, what its jail holds, and its memory cgroup.

Each VM gets a uid (= gid) of its own from a configured range (100000 and up by default),
allocated the first time it starts and recorded in the state directory (``jail-ids.json``,
kept until the VM is deleted), so a VM's worker always runs as the same account - Hyper-V's
per-VM worker account - and two VMs never share one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from pyhv.vmms.cgroup import MemoryCgroup
from pyhv.vmms.store import write_atomically
from pyhv.worker.jail import Jail, tools

log = logging.getLogger(__name__)

#: What a worker holds beyond its guest's RAM: the Python runtime and pyhv (~25 MiB resident),
#: KVM's and the kernel's per-process memory charged to the group, page cache of the files it
#: reads. The cgroup's limit is assigned + this.
DEFAULT_OVERHEAD = 96 << 20


@dataclass(frozen=True)
class JailPolicy:
    """How the VMMS jails its workers: the uid range and the memory overhead allowed."""

    uid_base: int = 100000
    uid_count: int = 65536
    overhead_bytes: int = DEFAULT_OVERHEAD
    #: Workers share the host's network namespace (the VMMS serves TCP, so its VMs may migrate
    #: and a source worker connects to its destination itself); otherwise each gets an empty one.
    network: bool = False


class JailIds:
    """Each VM's uid, kept in STATE/jail-ids.json."""

    def __init__(self, state_dir: Path, policy: JailPolicy) -> None:
        self.path = state_dir / "jail-ids.json"
        self.policy = policy
        self._lock = threading.Lock()

    def _load(self) -> dict[str, int]:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise OSError(f"{self.path} is unreadable ({e}): remove it to allocate again") from e
        return {str(k): int(v) for k, v in raw.items()}

    def uid(self, name: str) -> int:
        """VM `name`'s uid, allocated now if it has none."""
        with self._lock:
            ids = self._load()
            if name in ids:
                return ids[name]
            used = set(ids.values())
            p = self.policy
            free = next(
                (u for u in range(p.uid_base, p.uid_base + p.uid_count) if u not in used), None
            )
            if free is None:
                raise OSError(
                    f"all {p.uid_count} jail uids from {p.uid_base} are taken: delete VMs or "
                    "widen the range"
                )
            ids[name] = free
            write_atomically(self.path, json.dumps(ids, indent=1, sort_keys=True))
            return free

    def get(self, name: str) -> int | None:
        with self._lock:
            return self._load().get(name)

    def release(self, name: str) -> None:
        """The VM was deleted: its uid may go to another VM."""
        with self._lock:
            ids = self._load()
            if ids.pop(name, None) is not None:
                write_atomically(self.path, json.dumps(ids, indent=1, sort_keys=True))


class WorkerJails:
    """Builds each worker's jail and memory cgroup."""

    def __init__(self, state_dir: Path, policy: JailPolicy) -> None:
        tools()  # JailError now, not at the first VM's start
        self.policy = policy
        self.ids = JailIds(state_dir, policy)
        # Two VMMS on one host (a migration between them) may hold VMs of the same name: each
        # names its workers' cgroups after its state directory.
        self._tag = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
        self._runloop: tuple[str, ...] | None = None

    def _runloop_paths(self) -> tuple[str, ...]:
        """The C run loop's directory, built here (the jailed worker cannot build it) and made
        readable by the workers' uids; () if it cannot be built (workers use the Python loop)."""
        if self._runloop is None:
            from pyhv.kvm import fastrun

            try:
                module = fastrun.build()
                module.chmod(0o755)  # a worker of another uid dlopens it
                self._runloop = (str(module.parent),)
            except (fastrun.FastRunUnavailable, OSError) as e:
                log.warning("jailed workers use the Python run loop: %s", e)
                self._runloop = ()
        return self._runloop

    def jail(self, name: str, image: str, *, network: bool, page_file: str | None = None) -> Jail:
        """`page_file`: the VM's page file, made here (empty, the VM's uid's own) and bound
        into the jail writable: the worker's only writable host file."""
        uid = self.ids.uid(name)
        writable: tuple[str, ...] = ()
        if page_file is not None:
            fd = os.open(page_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.fchown(fd, uid, uid)
            finally:
                os.close(fd)
            writable = (page_file,)
        from pyhv.kvm import fastrun

        if fastrun.disabled():
            runloop: tuple[str, ...] = ()
            env: tuple[tuple[str, str], ...] = ((fastrun.DISABLE_ENV, "1"),)
        else:
            runloop = self._runloop_paths()
            env = (("PYHV_CACHE", str(Path(runloop[0]).parent)),) if runloop else ()
        return Jail(
            uid=uid,
            gid=uid,
            read_only=(str(Path(image).resolve()), *runloop),
            read_write=writable,
            network=network,
            env=env,
        )

    def cgroup(self, name: str, assigned_bytes: int) -> MemoryCgroup:
        """VM `name`'s worker's memory cgroup (`pyhv-workers/TAG-NAME`), limited to
        `assigned_bytes` + the overhead."""
        return MemoryCgroup.create(
            f"{self._tag}-{name}", assigned_bytes + self.policy.overhead_bytes
        )
