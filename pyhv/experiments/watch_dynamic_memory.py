"""The book's experiment "Watching Dynamic Memory", reproduced with a real guest under KVM.

A VM with Dynamic Memory boots under an in-process VMMS (its balancer loop, its counters). The
chart shows Guest Visible Physical Memory and Physical Memory on a scale of three times the
starting guest-visible memory, as the book sets it. In the guest, `testlimit -m 1000 -c 1`
commits about 1 GB: after a status report or two both counters jump together (a hot-add); the
balancer's add pacing (`BalancerConfig.max_add_pages`, `add_settle_s`) makes the first
addition too small, so after the settle time it adds again. `kill` ends Testlimit: memory stays
(the balancer's removal is lazy, `remove_delay_s`), then Physical Memory is trimmed by
ballooning back to where it started while Guest Visible Physical Memory stays.

`time_scale` multiplies the balancer's two delays (the book's: a trim after minutes; 0.1: ten
times sooner). Output: `counters.csv` (every counter), `watch-dynamic-memory.png`, `account.txt`
and `events.json` (the measured times) in the output directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyhv.counters.chart import draw_chart
from pyhv.counters.csvlog import read_csv
from pyhv.dynmem.balancer import BOOK_PACING, PAGES_PER_MIB, Add, BalancerConfig
from pyhv.experiments.lab import PHYSICAL, VISIBLE, Lab, MemoryPoint, counter_path

VM = "testvm"


@dataclass(frozen=True)
class WatchConfig:
    """The experiment's knobs. Memory in MiB. Startup = minimum, as Dynamic Memory had it in
    the book's Windows Server 2008 R2 SP1, so the trim ends where the VM started."""

    out: Path = Path("out/watch-dynamic-memory")
    time_scale: float = 1.0
    startup_mib: int = 768
    minimum_mib: int = 768
    maximum_mib: int = 4096
    buffer_percent: int = 20
    testlimit_mb: int = 1000
    budget_mib: int = 8192
    rest_s: float = 5.0
    hold_s: float = 5.0
    after_s: float = 5.0
    max_add_mib: int = int(BOOK_PACING["max_add_pages"]) // PAGES_PER_MIB
    add_settle_s: float = BOOK_PACING["add_settle_s"]
    remove_delay_s: float = 180.0

    def balancer(self) -> BalancerConfig:
        return BalancerConfig(
            remove_delay_s=self.remove_delay_s,
            time_scale=self.time_scale,
            max_add_pages=int(self.max_add_mib * PAGES_PER_MIB),
            add_settle_s=self.add_settle_s,
        )


@dataclass
class WatchResult:
    """The measured times (seconds since the experiment started) and levels (MiB)."""

    config: dict[str, object]
    start_visible_mib: float = 0.0
    start_physical_mib: float = 0.0
    events: dict[str, float] = field(default_factory=dict)
    levels: dict[str, float] = field(default_factory=dict)
    jumps: list[dict[str, float]] = field(default_factory=list)
    csv: str = ""
    png: str = ""

    def step(self, a: str, b: str) -> float:
        return self.events[b] - self.events[a]

    def account(self) -> str:
        c = BalancerConfig(
            remove_delay_s=float(str(self.config["remove_delay_s"])),
            time_scale=float(str(self.config["time_scale"])),
            add_settle_s=float(str(self.config["add_settle_s"])),
        )
        e, lv = self.events, self.levels
        lines = [
            "Watching Dynamic Memory (measured on PVM; time scale "
            f"{self.config['time_scale']}: trim after {c.effective_remove_delay_s:g} s above "
            f"target, add settle {c.effective_add_settle_s:g} s, at most "
            f"{self.config['max_add_mib']} MiB per add)",
            f"  VM {VM}: startup {self.config['startup_mib']} MiB, minimum "
            f"{self.config['minimum_mib']}, maximum {self.config['maximum_mib']}, buffer "
            f"{self.config['buffer_percent']} %; chart scale {3 * self.start_visible_mib:g} MiB "
            "(3 x Guest Visible Physical Memory at start)",
            f"  t={e['testlimit']:7.1f} s  testlimit -m {self.config['testlimit_mb']} -c 1",
            f"  t={e['spike_report']:7.1f} s  status report with the commit: demand "
            f"{lv['spike_demand']:.0f} MiB (+{self.step('testlimit', 'spike_report'):.1f} s)",
        ]
        for i, j in enumerate(self.jumps[:3]):
            label = ("first add", "second add", "third add")[i]
            since = "report" if i == 0 else "previous add"
            ref = e["spike_report"] if i == 0 else self.jumps[i - 1]["t"]
            lines.append(
                f"  t={j['t']:7.1f} s  {label}: Physical Memory {j['from']:.0f} -> "
                f"{j['to']:.0f} MiB, Guest Visible {j['visible_from']:.0f} -> "
                f"{j['visible_to']:.0f} MiB (+{j['t'] - ref:.1f} s after the {since})"
            )
        lines += [
            f"  t={e['relieved']:7.1f} s  pressure back under target "
            f"(+{self.step('spike_report', 'relieved'):.1f} s after the report)",
            f"  t={e['kill']:7.1f} s  kill (Testlimit ends)",
            f"  t={e['trim_start']:7.1f} s  trim starts (+{self.step('kill', 'trim_start'):.1f} s "
            "after kill: the levels stayed until then)",
            f"  t={e['trimmed']:7.1f} s  trimmed: Physical Memory {lv['trimmed_physical']:.0f} "
            f"MiB (started at {self.start_physical_mib:.0f}), Guest Visible "
            f"{lv['trimmed_visible']:.0f} MiB (peak {lv['peak_visible']:.0f}) "
            f"(+{self.step('kill', 'trimmed'):.1f} s after kill)",
            f"  files: {self.png}, {self.csv}",
        ]
        return "\n".join(lines)


def jumps(
    points: list[MemoryPoint], since: float, until: float, gap_s: float
) -> list[dict[str, float]]:
    """Increases of assigned memory between `since` and `until`, grouped into jumps: changes
    less than `gap_s` apart belong to one jump."""
    out: list[dict[str, float]] = []
    prev: MemoryPoint | None = None
    for p in points:
        if p.t < since:
            prev = p
            continue
        if p.t > until:
            break
        if prev is not None and p.assigned > prev.assigned:
            if out and p.t - out[-1]["last"] < gap_s:
                out[-1].update(to=p.assigned, visible_to=p.visible, last=p.t)
            else:
                out.append(
                    {
                        "t": p.t,
                        "last": p.t,
                        "from": prev.assigned,
                        "to": p.assigned,
                        "visible_from": prev.visible,
                        "visible_to": p.visible,
                    }
                )
        prev = p
    return out


def run_watch(config: WatchConfig, say: Callable[[str], object] = print) -> WatchResult:
    """Run the experiment; the result, with the chart, CSV and account written to `config.out`."""
    bal = config.balancer()
    settle = bal.effective_add_settle_s
    delay = bal.effective_remove_delay_s
    out = Path(config.out)
    result = WatchResult(
        {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}
    )
    ev = result.events
    with Lab(out, budget_mib=config.budget_mib, balancer=bal) as lab:
        lab.create(
            VM,
            memory=f"{config.startup_mib}M",
            minimum=f"{config.minimum_mib}M",
            maximum=f"{config.maximum_mib}M",
            buffer=config.buffer_percent,
        )
        console = lab.start(VM)
        lab.begin()
        say(f"booting {VM} ({config.startup_mib} MiB, Dynamic Memory) ...")
        console.wait_prompt()
        start = lab.wait_reporting(VM)
        ev["booted"] = start.t
        result.start_visible_mib, result.start_physical_mib = start.visible, start.assigned
        say(f"t={start.t:.1f} s  booted; resting {config.rest_s:g} s")
        lab.sleep(config.rest_s)
        rest = lab.last(VM) or start
        base_demand = rest.demand or 0.0

        ev["testlimit"] = lab.now()
        console.run(f"testlimit -m {config.testlimit_mb} -c 1", b"committed")
        say(f"t={ev['testlimit']:.1f} s  testlimit -m {config.testlimit_mb} -c 1")
        spike = lab.wait(
            VM,
            lambda p: (p.demand or 0) >= base_demand + 0.9 * config.testlimit_mb,
            30,
            "a status report showing Testlimit's commit",
        )
        ev["spike_report"] = spike.t
        result.levels["spike_demand"] = spike.demand or 0.0
        first = lab.wait(VM, lambda p: p.assigned > rest.assigned, 30, "a first add")
        ev["first_add"] = first.t
        say(
            f"t={first.t:.1f} s  first add: Physical Memory {rest.assigned:.0f} -> {first.assigned:.0f} MiB"
        )
        buffer = 1 + config.buffer_percent / 100

        def relieved(p: MemoryPoint) -> bool:
            return p.demand is not None and p.assigned >= p.demand * buffer - 2

        r = lab.wait(VM, relieved, 3 * settle + 60, "pressure back under target")
        ev["relieved"] = r.t
        say(f"t={r.t:.1f} s  pressure back under target at {r.assigned:.0f} MiB")
        lab.wait_stable(VM, max(2.0, min(settle, 5.0)), 2 * settle + 60, "the adds ending")
        lab.sleep(config.hold_s)

        peak = lab.last(VM) or r
        result.levels["peak_physical"], result.levels["peak_visible"] = peak.assigned, peak.visible
        ev["kill"] = lab.now()
        console.run("kill", b"killed")
        say(f"t={ev['kill']:.1f} s  kill; the balancer trims after {delay:g} s above target")
        trim = lab.wait(VM, lambda p: p.assigned < peak.assigned, delay + 60, "a trim")
        ev["trim_start"] = trim.t
        say(f"t={trim.t:.1f} s  trim starts")
        low = lab.wait(
            VM,
            lambda p: (
                p.assigned <= config.minimum_mib + 2 or p.assigned <= (p.demand or 0) * buffer + 2
            ),
            120,
            "the trim reaching target",
        )
        ev["trimmed"] = low.t
        result.levels["trimmed_physical"], result.levels["trimmed_visible"] = (
            low.assigned,
            low.visible,
        )
        say(
            f"t={low.t:.1f} s  trimmed to {low.assigned:.0f} MiB; watching {config.after_s:g} s more"
        )
        lab.sleep(config.after_s)
        end = lab.last(VM) or low
        result.levels["end_physical"], result.levels["end_visible"] = end.assigned, end.visible
        history = list(lab.history[VM])
        decided = next(
            (
                t
                for t, d in lab.decisions
                if t >= ev["testlimit"] and isinstance(d.operation_for(VM), Add)
            ),
            None,
        )
    if decided is not None:
        ev["first_add_decided"] = decided
    result.jumps = jumps(history, ev["testlimit"], ev["kill"], gap_s=max(1.5, settle / 2))
    for i, j in enumerate(result.jumps[:2]):
        ev[("first_jump", "second_jump")[i]] = j["t"]
    result.csv = str(lab.csv_path)
    png = out / "watch-dynamic-memory.png"
    samples = read_csv(lab.csv_path)
    draw_chart(
        samples,
        [counter_path(VM, VISIBLE), counter_path(VM, PHYSICAL)],
        png,
        title=f"Watching Dynamic Memory (time scale {config.time_scale:g}; measured on PVM)",
        y_max=3 * result.start_visible_mib,
        y_label="MB",
    )
    result.png = str(png)
    (out / "events.json").write_text(json.dumps(asdict(result), indent=2) + "\n")
    (out / "account.txt").write_text(result.account() + "\n")
    return result
