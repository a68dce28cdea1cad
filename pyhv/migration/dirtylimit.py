"""The per-VP dirty rate and its limit (QEMU 8.1's dirty-limit), for a VM created with the
dirty ring (pyhv.hypervisor.dirtyring).

During a migration a harvester thread empties every VP's ring every `interval` (10 ms); each
harvest, and each KVM_EXIT_DIRTY_RING_FULL a VP harvests itself, says how many distinct pages
each VP wrote since the last one. That gives each VP's dirty rate (pages/s over the last
`window`), and, with a limit, each VP's debt: a VP that wrote `p` pages may run again at

    free_at = max(free_at, now - interval) + p / limit

(at most one interval of unused time is credited), and one whose free_at lies ahead is asked to
sleep until then in its own thread at its next exit (`VirtualProcessor.throttle`). A VP that
only reads writes no pages and is never slowed; auto-converge, which pauses every VP, stays for
VMs without the ring.

What the limit guarantees: a VP runs between two sleeps from a free time in the past, so over
any window of W seconds the pages its harvests list are at most `limit x (W + interval) + B`,
B the most it wrote in one run between two sleeps (reported as `vp_burst_max`: what it writes
from waking until a harvest finds it over and the kick stops it, counted generously: the pages
of the harvest that sees a sleep end count on both sides), so the rate reported over the window
stays at or below `limit x (1 + interval / W) + B / W`.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING, Any

from pyhv.migration.stream import MigrationError

if TYPE_CHECKING:
    from pyhv.hypervisor.partition import Partition

INTERVAL = 0.01  #: seconds between harvests
WINDOW = 1.0  #: seconds a VP's reported rate is averaged over
AUTO_SHARE = 0.25  #: `auto`: the VPs together may dirty this share of the measured bandwidth
MIN_LIMIT = 64  #: pages/s: the lowest limit (a VP still runs, if slowly)
PAGE = 4096


def parse_limit(value: object) -> int | str | None:
    """The `dirty_limit` option: pages/s per VP (an int >= MIN_LIMIT), "auto", or None (off);
    MigrationError naming the value otherwise."""
    if value is None or value == 0:
        return None
    if value == "auto":
        return "auto"
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_LIMIT:
        raise MigrationError(
            f"dirty_limit={value!r}: give the pages per second each VP may dirty (at least "
            f"{MIN_LIMIT}, e.g. 2000), or 'auto' (a share of the measured bandwidth)"
        )
    return value


def auto_limit(bandwidth: float, vps: int, share: float = AUTO_SHARE) -> int:
    """`auto`: pages/s per VP so that all VPs together dirty at most `share` of what the link
    carries (bytes/s): the passes then shrink the dirty set by at least 1 - share."""
    return max(MIN_LIMIT, int(share * bandwidth / PAGE / max(vps, 1)))


def next_free(free_at: float, pages: int, limit: float, now: float, credit: float) -> float:
    """When a VP that wrote `pages` may run again: its debt in time (pages / limit) added to
    its previous free time, or to `now - credit` if that passed longer ago (the unused time
    of one interval is credited, no more)."""
    return max(free_at, now - credit) + pages / limit


def rate_bound(limit: float, burst_max: int, window: float = WINDOW) -> float:
    """The highest rate over `window` a limited VP can show when it wrote at most `burst_max`
    pages between two sleeps (see the module docstring)."""
    return limit * (1 + INTERVAL / window) + burst_max / window


class DirtyLimiter:
    """Measures each VP's dirty rate through the partition's rings and, with a limit, slows the
    VPs over it. `start()` runs the harvester thread; `stop()` ends it and every throttle."""

    def __init__(
        self,
        partition: Partition,
        limit: int | None = None,
        interval: float = INTERVAL,
        window: float = WINDOW,
    ) -> None:
        rings = partition.dirty_rings
        if rings is None:
            raise MigrationError(
                f"VM {partition.name!r} logs dirty pages in KVM's bitmap, which cannot tell the "
                "VPs apart: a dirty limit needs a VM created with the dirty ring (VM option "
                "dirty_ring_entries, `pyhv run --dirty-ring 4096`, `pyhv vm create --dirty-ring "
                "4096`); migrate without dirty_limit (auto-converge slows the whole VM)",
                "config",
            )
        self.partition = partition
        self.rings = rings
        self.limit = limit
        self.interval = interval
        self.window = window
        self._lock = threading.Lock()
        self._free_at: dict[int, float] = {}
        self._recent: dict[int, collections.deque[tuple[float, int]]] = {}
        self.pages: dict[int, int] = {i: 0 for i in partition.vps}  # since start
        self.burst_max: dict[int, int] = {i: 0 for i in partition.vps}  # most between sleeps
        self._burst: dict[int, int] = {}  # pages since the VP last woke
        self._slept: dict[int, float] = {}  # its throttled_seconds at the last harvest
        self._slept0 = {i: vp.throttled_seconds for i, vp in partition.vps.items()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = 0.0
        self.limited_since: float | None = None  # when the limit (if any) came in force

    # --- life -------------------------------------------------------------------------------

    def start(self) -> None:
        self.started = time.monotonic()
        if self.limit is not None:
            self.limited_since = self.started
        self.rings.listeners.append(self._on_harvest)
        self._thread = threading.Thread(target=self._run, name="dirty-harvester", daemon=True)
        self._thread.start()

    def set_limit(self, limit: int | None) -> None:
        with self._lock:
            if limit is not None and self.limit is None:
                self.limited_since = time.monotonic()
            self.limit = limit

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        try:
            self.rings.listeners.remove(self._on_harvest)
        except ValueError:
            pass
        for vp in self.partition.vps.values():
            vp.throttle(0.0)  # a VP asleep for the limit runs on now

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.rings.harvest()
            except OSError:  # the VM is going away under us: the owner stops us next
                return

    # --- per harvest ------------------------------------------------------------------------

    def _on_harvest(self, counts: dict[int, int], now: float) -> None:
        """A harvest listed `counts` pages per VP (from any thread, the VP's own included)."""
        ask: list[tuple[int, float]] = []
        with self._lock:
            limit = self.limit
            for index, pages in counts.items():
                self.pages[index] = self.pages.get(index, 0) + pages
                vp = self.partition.vps.get(index)
                slept = vp.throttled_seconds if vp is not None else 0.0
                burst = self._burst.get(index, 0) + pages
                if slept != self._slept.get(index, 0.0):  # it slept since: a run ended
                    self._slept[index] = slept
                    self.burst_max[index] = max(self.burst_max.get(index, 0), burst)
                    burst = pages  # these pages may be from either run: counted in both
                self._burst[index] = burst
                self.burst_max[index] = max(self.burst_max.get(index, 0), burst)
                recent = self._recent.setdefault(index, collections.deque())
                recent.append((now, pages))
                while recent and recent[0][0] <= now - self.window:
                    recent.popleft()
                if limit is None:
                    continue
                free = next_free(self._free_at.get(index, 0.0), pages, limit, now, self.interval)
                self._free_at[index] = free
                if free > now:
                    ask.append((index, free))
        for index, until in ask:
            vp = self.partition.vps.get(index)
            if vp is not None:
                vp.throttle(until)

    # --- what it measured ---------------------------------------------------------------

    def rates(self, now: float | None = None) -> list[float]:
        """Pages/s each VP dirtied over the last window (over the time since start while that
        is shorter), by VP index."""
        now = time.monotonic() if now is None else now
        span = min(self.window, max(now - self.started, 1e-3))
        out = []
        with self._lock:
            for index in sorted(self.partition.vps):
                recent = self._recent.get(index, ())
                n = sum(p for t, p in recent if t > now - self.window)
                out.append(round(n / span, 1))
        return out

    def throttled_ms(self) -> list[float]:
        """Milliseconds each VP slept for the limit since start, by VP index."""
        vps = self.partition.vps
        return [
            round((vps[i].throttled_seconds - self._slept0.get(i, 0.0)) * 1000, 1)
            for i in sorted(vps)
        ]

    def report(self) -> dict[str, Any]:
        """The progress fields: per-VP rates, pages, sleep; the limit and for how long."""
        now = time.monotonic()
        return {
            "vp_dirty_rates": self.rates(now),
            "vp_dirty_pages": [self.pages.get(i, 0) for i in sorted(self.partition.vps)],
            "vp_throttled_ms": self.throttled_ms(),
            "vp_burst_max": [self.burst_max.get(i, 0) for i in sorted(self.partition.vps)],
            "dirty_limit": self.limit or 0,
            "dirty_limit_seconds": 0.0
            if self.limited_since is None
            else round(now - self.limited_since, 3),
            "dirty_ring_overflows": self.rings.overflows,
            "dirty_ring_full_exits": [
                self.rings.full_exits.get(i, 0) for i in sorted(self.partition.vps)
            ],
        }
