"""What the experiments share: an in-process VMMS (its own balancer loop, its counters) in a
temporary state directory, a CSV of every counter sampled while the experiment runs, each VM's
console, and a watcher per VM that records every change of its memory as the worker reports it
(for the measured times of each step)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyhv.counters.csvlog import CsvLog
from pyhv.dynmem.balancer import PAGES_PER_MIB, BalancerConfig, Decision
from pyhv.dynmem.status import MemoryStatus
from pyhv.vmms.service import Vmms, VmmsError

MIB = 1 << 20
PROMPT = b"pyhv> "

VM_SET = r"\Hyper-V Dynamic Memory VM"
VISIBLE = "Guest Visible Physical Memory"
PHYSICAL = "Physical Memory"


def counter_path(vm: str, counter: str) -> str:
    """The Perfmon path of a per-VM Dynamic Memory counter."""
    return f"{VM_SET}({vm})\\{counter}"


class ExperimentError(RuntimeError):
    """The experiment could not go on (the VM did not boot, a step never happened); the
    message says which step and what was seen."""


@dataclass(frozen=True, slots=True)
class MemoryPoint:
    """One memory status of a VM, in MiB, when it changed (seconds since the lab started)."""

    t: float
    visible: float
    assigned: float
    ballooned: float
    demand: float | None


class Console:
    """A VM's serial console: everything it printed, and typing into it."""

    def __init__(self, vmms: Vmms, name: str) -> None:
        self._vmms = vmms
        self.name = name
        self.output = bytearray()
        self._cv = threading.Condition()
        self.detach = vmms.attach(name, self._got)

    def _got(self, data: bytes) -> None:
        with self._cv:
            self.output += data
            self._cv.notify_all()

    def mark(self) -> int:
        with self._cv:
            return len(self.output)

    def wait_for(self, marker: bytes, since: int = 0, timeout: float = 60.0) -> bytes:
        """Wait until `marker` appears after position `since`; the output from there."""
        with self._cv:
            ok = self._cv.wait_for(lambda: marker in self.output[since:], timeout)
            if not ok:
                tail = bytes(self.output[-400:]).decode(errors="replace")
                raise ExperimentError(
                    f"VM {self.name}: {marker!r} did not appear within {timeout:.0f} s; "
                    f"the console ends with:\n{tail}"
                )
            return bytes(self.output[since:])

    def type(self, line: str) -> int:
        """Type `line` and Enter; the output position before it (for wait_for)."""
        pos = self.mark()
        self._vmms.type(self.name, line.encode() + b"\r")
        return pos

    def wait_prompt(self, timeout: float = 120.0) -> None:
        """Wait for the shell (the guest has booted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pos = self.mark()
            try:
                self._vmms.type(self.name, b"\r")
            except VmmsError:
                pass
            try:
                self.wait_for(PROMPT, pos, 2.0)
                return
            except ExperimentError:
                continue
        raise ExperimentError(f"VM {self.name}: no shell prompt within {timeout:.0f} s")

    def run(self, line: str, marker: bytes = PROMPT, timeout: float = 60.0) -> bytes:
        return self.wait_for(marker, self.type(line), timeout)


class Lab:
    """An in-process VMMS with a counter CSV and per-VM memory watchers."""

    def __init__(
        self,
        out: Path,
        *,
        budget_mib: int,
        balancer: BalancerConfig,
        reserve_mib: int = 0,
        sample_s: float = 0.5,
        poll_s: float = 0.05,
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out = out
        self.state_dir = Path(tempfile.mkdtemp(prefix="pyhv-experiment-"))
        self.vmms = Vmms(
            self.state_dir,
            budget_bytes=budget_mib * MIB,
            reserve_bytes=reserve_mib * MIB,
            balancer=balancer,
        )
        self.config = balancer
        self._t0 = time.monotonic()
        self.csv_path = out / "counters.csv"
        self.csv = CsvLog(self.csv_path, self.vmms.registry, clock=self.now)
        self.consoles: dict[str, Console] = {}
        self.history: dict[str, list[MemoryPoint]] = {}
        self.decisions: list[tuple[float, Decision]] = []
        self._sample_s = sample_s
        self._poll_s = poll_s
        self._stop = threading.Event()
        self._hist_cv = threading.Condition()
        self._threads: list[threading.Thread] = []
        #: (time, VM, assigned MiB) of every status the pool took, in its order: unlike the
        #: sampled counters, no change falls between two samples.
        self.pushes: list[tuple[float, str, float]] = []
        #: Each VM's guest's page file writes (pages) in its last status report.
        self.page_file_writes: dict[str, int] = {}
        self.vmms.status_listeners.append(self._pushed)

    def _pushed(self, name: str, status: MemoryStatus) -> None:
        with self._hist_cv:
            self.pushes.append((self.now(), name, status.assigned_pages / PAGES_PER_MIB))
            self.page_file_writes[name] = status.page_file_writes

    def assigned_at(self, since: float, vm: str) -> dict[str, float]:
        """Every VM's assigned MiB as the pool had it at the first status after `since` in
        which VM `vm` was assigned more than before (empty if it never grew)."""
        with self._hist_cv:
            pushes = list(self.pushes)
        latest: dict[str, float] = {}
        for t, name, assigned in pushes:
            grew = name == vm and t > since and name in latest and assigned > latest[name]
            latest[name] = assigned
            if grew:
                return latest
        return {}

    def now(self) -> float:
        return time.monotonic() - self._t0

    # --- VMs ------------------------------------------------------------------------------

    def create(self, name: str, **settings: Any) -> None:
        self.vmms.create({"name": name, "dynamic_memory": True, **settings})

    def start(self, name: str) -> Console:
        self.vmms.start(name)
        console = self.consoles[name] = Console(self.vmms, name)
        self.history[name] = []
        return console

    def wait_reporting(self, name: str, timeout: float = 60.0) -> MemoryPoint:
        """Wait until the VM's guest has sent its first status report."""
        return self.wait(name, lambda p: p.demand is not None, timeout, "a first status report")

    # --- sampling -------------------------------------------------------------------------

    def begin(self) -> None:
        """Start the balancer loop, the counter sampler and the memory watcher."""
        self.vmms.start_balancer()
        for target in (self._sampler, self._watcher):
            t = threading.Thread(target=target, name=f"lab-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def _sampler(self) -> None:
        next_t = self.now()
        while not self._stop.is_set():
            self.csv.sample(self.now())
            next_t += self._sample_s
            self._stop.wait(max(0.0, next_t - self.now()))

    def _watcher(self) -> None:
        while not self._stop.wait(self._poll_s):
            d = self.vmms.balancer.last_decision
            if d is not None and (not self.decisions or self.decisions[-1][1] is not d):
                self.decisions.append((self.now(), d))
            for name in list(self.history):
                try:
                    st = self.vmms.memory_status(name)
                except VmmsError:
                    continue
                committed = st.get("committed")
                point = MemoryPoint(
                    self.now(),
                    st["visible"] / MIB,
                    st["assigned"] / MIB,
                    st["ballooned"] / MIB,
                    None if committed is None else committed / MIB,
                )
                with self._hist_cv:
                    h = self.history[name]
                    if not h or (h[-1].visible, h[-1].assigned, h[-1].demand) != (
                        point.visible,
                        point.assigned,
                        point.demand,
                    ):
                        h.append(point)
                        self._hist_cv.notify_all()

    def last(self, name: str) -> MemoryPoint | None:
        with self._hist_cv:
            h = self.history[name]
            return h[-1] if h else None

    def wait(
        self,
        name: str,
        condition: Callable[[MemoryPoint], bool],
        timeout: float,
        what: str,
    ) -> MemoryPoint:
        """The first point of VM `name` (from now on, or the latest) satisfying `condition`."""
        with self._hist_cv:
            seen = max(0, len(self.history[name]) - 1)
            deadline = time.monotonic() + timeout
            while True:
                h = self.history[name]
                for p in h[seen:]:
                    if condition(p):
                        return p
                seen = len(h)
                left = deadline - time.monotonic()
                if left <= 0:
                    last = h[-1] if h else None
                    raise ExperimentError(
                        f"VM {name}: {what} did not happen within {timeout:.0f} s (last memory "
                        f"status: {last})"
                    )
                self._hist_cv.wait(left)

    def wait_stable(self, name: str, quiet_s: float, timeout: float, what: str) -> MemoryPoint:
        """Wait until the VM's assigned memory has not changed for `quiet_s` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.last(name)
            if p is not None:
                changed = self._last_assigned_change(name)
                if self.now() - changed >= quiet_s:
                    return p
            time.sleep(0.1)
        raise ExperimentError(f"VM {name}: {what} did not happen within {timeout:.0f} s")

    def _last_assigned_change(self, name: str) -> float:
        with self._hist_cv:
            h = self.history[name]
            for a, b in zip(reversed(h[:-1]), reversed(h), strict=False):
                if a.assigned != b.assigned or a.visible != b.visible:
                    return b.t
            return h[0].t if h else self.now()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def close(self) -> None:
        """Stop sampling (one last row), stop the VMs and the service, remove the state."""
        if not self._stop.is_set():
            self.csv.sample(self.now())
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for c in self.consoles.values():
            c.detach()
        try:
            self.vmms.close()
        finally:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def mib(pages: float) -> float:
    return pages / PAGES_PER_MIB
