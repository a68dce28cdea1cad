"""The host's memory pool as the VMMS accounts it: the budget for VMs, the host reserve, what
each running VM is assigned, and the free pool, in 4 KiB pages.

The guest RAM lives in each worker process, whose memory manager (pyhv.memory) accounts it:
visible, assigned (= visible - ballooned), ballooned. The worker pushes those figures in every
memory status (pyhv.dynmem.status.MemoryStatus); the pool keeps each VM's latest status, and
its accounting is computed from them: free = budget - reserve - sum(assigned). A VM admitted but
not yet reporting counts the memory it was admitted with (its startup memory). A VM that ends
(or whose worker dies) returns everything by leaving the pool.

:meth:`HostPool.assigned_pages` is the one place a VM's assigned memory is read: the worker's
own figure, or the kernel's when that is larger (the blocks of the worker's guest-RAM memfds,
recorded by the VMMS's claims check, pyhv.vmms.claims): a worker cannot make the pool hand out
memory its guest still holds.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from pyhv.dynmem.status import MemoryStatus
from pyhv.memory.manager import PAGE_SIZE, PoolExhausted


def host_memory_bytes() -> int:
    """MemTotal of this host (the default budget)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise OSError("MemTotal not found in /proc/meminfo")


@dataclass
class _Held:
    admitted_pages: int
    status: MemoryStatus | None = None
    received: int = 0
    #: Pages the kernel holds in the worker's guest RAM, when the VMMS last looked.
    kernel_pages: int = 0


class HostPool:
    """Free pool, reserve and each running VM's assigned memory, in 4 KiB pages; the latest
    memory status of each VM. Thread-safe (worker reader threads record, the balancer reads)."""

    def __init__(self, budget_bytes: int, reserve_bytes: int = 0) -> None:
        self.budget_pages = budget_bytes // PAGE_SIZE
        self.reserve_pages = min(reserve_bytes // PAGE_SIZE, self.budget_pages)
        self._vms: dict[str, _Held] = {}
        self._lock = threading.Lock()
        #: The most the VMs were assigned together, over every admission and recorded status:
        #: the pool's own check that the balancer never gave out more than the budget.
        self.peak_assigned_pages = 0

    # --- per VM ---------------------------------------------------------------------------

    def admit(self, name: str, startup_bytes: int) -> None:
        """Take a starting VM's startup memory; PoolExhausted (a MemoryManagerError) says how
        much is missing."""
        pages = -(-startup_bytes // PAGE_SIZE)
        with self._lock:
            if name in self._vms:
                raise PoolExhausted(f"VM {name!r} holds memory of the pool already")
            free = self._free()
            if pages > free:
                raise PoolExhausted(
                    f"{pages} pages wanted for {name}, {free} free (budget {self.budget_pages}, "
                    f"reserve {self.reserve_pages})"
                )
            self._vms[name] = _Held(pages)
            self._note_peak()

    def readmit(self, name: str, assigned_bytes: int) -> None:
        """A running VM a restarted VMMS adopted: what it holds counts, whatever is free (it
        holds it already; a smaller budget now leaves the pool short, not the VM)."""
        with self._lock:
            self._vms[name] = _Held(-(-assigned_bytes // PAGE_SIZE))
            self._note_peak()

    def record(self, name: str, status: MemoryStatus) -> bool:
        """The latest memory status pushed by the VM's worker; False if the VM is not held
        (it ended meanwhile) and the status was dropped."""
        with self._lock:
            held = self._vms.get(name)
            if held is None:
                return False
            held.status = status
            held.received += 1
            self._note_peak()
            return True

    def record_kernel(self, name: str, pages: int) -> None:
        """The kernel's figure for the VM's guest RAM (the claims check)."""
        with self._lock:
            held = self._vms.get(name)
            if held is not None:
                held.kernel_pages = pages

    def received(self, name: str) -> int:
        """How many statuses of VM `name` were recorded (0 if the pool does not hold it): a
        status recorded after a request was answered is newer than the request."""
        with self._lock:
            held = self._vms.get(name)
            return 0 if held is None else held.received

    def latest(self, name: str) -> MemoryStatus | None:
        """The VM's latest memory status, None before its worker pushed one."""
        with self._lock:
            held = self._vms.get(name)
            return None if held is None else held.status

    def holds(self, name: str) -> bool:
        with self._lock:
            return name in self._vms

    def assigned_pages(self, name: str) -> int:
        """The pages VM `name` is assigned: what its worker's memory manager reports (its
        admitted memory until it reports), or what the kernel holds for it if that is more.
        KeyError if the pool does not hold it."""
        with self._lock:
            return self._assigned(self._vms[name])

    @staticmethod
    def _assigned(held: _Held) -> int:
        claimed = held.admitted_pages if held.status is None else held.status.assigned_pages
        return max(claimed, held.kernel_pages)

    def claimed_pages(self, name: str) -> int:
        """What the worker says VM `name` is assigned (its admitted memory until it reports)."""
        with self._lock:
            held = self._vms[name]
            return held.admitted_pages if held.status is None else held.status.assigned_pages

    def pages(self, name: str) -> tuple[int, int, int]:
        """(visible, assigned, ballooned) pages of a running VM as accounted."""
        with self._lock:
            held = self._vms[name]
            assigned = self._assigned(held)
            if held.status is None:
                return assigned, assigned, 0
            return held.status.visible_pages, assigned, held.status.ballooned_pages

    def give_back(self, name: str) -> int:
        """A VM ended (or its worker died): everything it held returns to the pool."""
        with self._lock:
            held = self._vms.pop(name, None)
            return 0 if held is None else self._assigned(held)

    # --- the host -------------------------------------------------------------------------

    @property
    def free_pages(self) -> int:
        """Pages no VM holds, excluding the host reserve (pass as HostMemory(free, 0))."""
        with self._lock:
            return self._free()

    def _used(self) -> int:
        return sum(self._assigned(h) for h in self._vms.values())

    def _note_peak(self) -> None:
        self.peak_assigned_pages = max(self.peak_assigned_pages, self._used())

    def _free(self) -> int:
        used = self._used()
        # Below 0 when workers hold more than the budget (say, a VM migrated in with more than it
        # was admitted with): then nothing is free.
        return max(0, self.budget_pages - self.reserve_pages - used)
