"""Memory contention between weighted Dynamic Memory VMs on a host smaller than the sum of their
maxima: who gets memory, nobody below minimum, and the density Dynamic Memory buys against
static allocation at each VM's peak.

Three VMs (weight 80, 50, 20; startup 512 MiB, minimum 256, maximum 2048: 6 GiB of maxima) on a
2 GiB host budget run bursty Testlimit workloads:

- A (80) and C (20) start Testlimit in the same balancer tick: the free pool cannot cover both,
  so A's demand is served first, C gets what is left, and B's idle surplus is ballooned out at
  once (not lazily) so that C's demand can be met the next tick;
- A ends; B (50) starts: the memory A no longer needs is taken back at once for B;
- C and B end; every VM is trimmed lazily towards its target (never below its minimum).

The timeline is given at time scale 0.1 and stretched with it. Output: `counters.csv`,
`contention.png` (Physical Memory of each VM and their sum, on the host budget's scale),
`account.txt` and `events.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pyhv.counters.chart import draw_chart
from pyhv.counters.csvlog import read_csv
from pyhv.dynmem.balancer import Add, BalancerConfig, mib_from_pages
from pyhv.experiments.lab import PHYSICAL, VISIBLE, Lab, counter_path


@dataclass(frozen=True)
class ContentionVm:
    name: str
    weight: int
    startup_mib: int = 512
    minimum_mib: int = 256
    maximum_mib: int = 2048


#: (seconds at time scale 0.1, VM names, shell command); VMs listed together start in one tick.
TIMELINE: tuple[tuple[float, tuple[str, ...], str], ...] = (
    (2.0, ("A", "C"), "testlimit -m 700 -c 1"),
    (12.0, ("A",), "kill"),
    (15.0, ("B",), "testlimit -m 700 -c 1"),
    (25.0, ("C",), "kill"),
    (30.0, ("B",), "kill"),
)


@dataclass(frozen=True)
class ContentionConfig:
    out: Path = Path("out/contention")
    time_scale: float = 0.1
    budget_mib: int = 2048
    vms: tuple[ContentionVm, ...] = (
        ContentionVm("A", 80),
        ContentionVm("B", 50),
        ContentionVm("C", 20),
    )
    timeline: tuple[tuple[float, tuple[str, ...], str], ...] = TIMELINE
    settle_s: float = 5.0
    #: Each VM's page file (MiB; 0: none): a guest that cannot get memory pages instead.
    page_file_mib: int = 0

    def balancer(self) -> BalancerConfig:
        return BalancerConfig(time_scale=self.time_scale)

    @property
    def stretch(self) -> float:
        return self.time_scale / 0.1


@dataclass
class ContentionResult:
    config: dict[str, object]
    events: list[dict[str, object]] = field(default_factory=list)
    vms: dict[str, dict[str, float]] = field(default_factory=dict)
    first_short_tick: dict[str, object] = field(default_factory=dict)
    peak_used_mib: float = 0.0
    #: The most the VMs were assigned together by the pool's own accounting, over every
    #: status it took (the sampled peak_used_mib can miss a moment; this cannot).
    pool_peak_mib: float = 0.0
    #: Each VM's assigned MiB at the first status in which the highest-weight VM grew after
    #: the VMs listed together started their workloads.
    at_first_growth: dict[str, float] = field(default_factory=dict)
    sum_of_peaks_mib: float = 0.0
    sum_of_maxima_mib: float = 0.0
    budget_mib: float = 0.0
    csv: str = ""
    png: str = ""

    @property
    def density(self) -> float:
        """Memory static allocation would need (each VM at its peak) per MiB actually used."""
        return self.sum_of_peaks_mib / self.peak_used_mib if self.peak_used_mib else 0.0

    def account(self) -> str:
        lines = [
            f"Memory contention (measured on PVM; time scale {self.config['time_scale']}): "
            f"host budget {self.budget_mib:.0f} MiB, sum of maxima {self.sum_of_maxima_mib:.0f} MiB",
        ]
        for name, v in self.vms.items():
            lines.append(
                f"  VM {name} (weight {v['weight']:.0f}): minimum {v['minimum']:.0f} MiB, lowest "
                f"Physical Memory {v['lowest']:.0f}, peak {v['peak']:.0f} (first at "
                f"t={v['peak_t']:.1f} s; demand peak {v['peak_demand']:.0f} MiB)"
            )
        if self.config.get("page_file_mib"):
            lines.append(
                f"  page files of {self.config['page_file_mib']} MiB: pages each guest paged out "
                "(and back in) when it could not get memory: "
                + ", ".join(
                    f"{n} {v.get('page_outs', 0):.0f} ({v.get('page_outs', 0) / 256:.0f} MiB; in "
                    f"{v.get('page_ins', 0):.0f}; last DM status page_file_writes "
                    f"{v.get('page_file_writes', 0):.0f})"
                    for n, v in self.vms.items()
                )
            )
        for e in self.events:
            lines.append(f"  t={e['t']:6.1f} s  {', '.join(e['vms'])}: {e['command']}")  # type: ignore[arg-type]
        s = self.first_short_tick
        if s:
            lines.append(
                f"  first tick with the host short (t={s['t']:.1f} s): "
                + ", ".join(f"{k} {v:+.0f} MiB" for k, v in s["operations"].items())  # type: ignore[attr-defined]
            )
        if self.at_first_growth:
            lines.append(
                "  assigned at the first status in which the highest-weight VM grew: "
                + ", ".join(f"{k} {v:.0f} MiB" for k, v in sorted(self.at_first_growth.items()))
            )
        lines += [
            f"  static allocation at each VM's peak: {self.sum_of_peaks_mib:.0f} MiB; Dynamic Memory "
            f"used at most {self.peak_used_mib:.0f} MiB of the {self.budget_mib:.0f} MiB budget "
            f"(density x{self.density:.2f}; at most {self.pool_peak_mib:.0f} MiB assigned by the "
            "pool's accounting at any status)",
            f"  files: {self.png}, {self.csv}",
        ]
        return "\n".join(lines)


def run_contention(
    config: ContentionConfig, say: Callable[[str], object] = print
) -> ContentionResult:
    out = Path(config.out)
    bal = config.balancer()
    result = ContentionResult(
        {
            "time_scale": config.time_scale,
            "budget_mib": config.budget_mib,
            "page_file_mib": config.page_file_mib,
        },
        budget_mib=config.budget_mib,
        sum_of_maxima_mib=sum(v.maximum_mib for v in config.vms),
    )
    names = [v.name for v in config.vms]
    with Lab(out, budget_mib=config.budget_mib, balancer=bal, poll_s=0.1) as lab:
        for v in config.vms:
            lab.create(
                v.name,
                memory=f"{v.startup_mib}M",
                minimum=f"{v.minimum_mib}M",
                maximum=f"{v.maximum_mib}M",
                weight=v.weight,
                **({"page_file_size": f"{config.page_file_mib}M"} if config.page_file_mib else {}),
            )
        consoles = {v.name: lab.start(v.name) for v in config.vms}
        lab.begin()
        say(f"booting {', '.join(names)} ...")
        for name, c in consoles.items():
            c.wait_prompt()
            lab.wait_reporting(name)
        t0 = lab.now()
        say(f"t={t0:.1f} s  all booted and reporting")
        together_at: float | None = None
        for at, vms, command in config.timeline:
            lab.sleep(t0 + at * config.stretch - lab.now())
            marker = b"committed" if command.startswith("testlimit") else b"killed"
            if len(vms) > 1:
                # One tick sees all of them: hold the loop until each guest has reported.
                with lab.vmms.balancer.paused():
                    t = lab.now()
                    for name in vms:
                        consoles[name].run(command, marker)
                    for name in vms:
                        lab.wait(
                            name,
                            # the guest reports a burst at once: the point may be a few ms
                            # after the command
                            lambda p, t=t: p.t > t and (p.demand or 0) > 600,  # type: ignore[misc]
                            10,
                            "a status report with the commit",
                        )
                    together_at = lab.now()
            else:
                t = lab.now()
                consoles[vms[0]].run(command, marker)
            result.events.append({"t": t, "vms": list(vms), "command": command})
            say(f"t={t:.1f} s  {', '.join(vms)}: {command}")
        # Let every VM be trimmed to its target (lazily, after the removal delay).
        lab.sleep(bal.effective_remove_delay_s + config.settle_s * config.stretch + 8)
        history = {n: list(lab.history[n]) for n in names}
        result.pool_peak_mib = mib_from_pages(lab.vmms.pool.peak_assigned_pages)
        if result.events and len(result.events[0]["vms"]) > 1:  # type: ignore[arg-type]
            first = max(config.vms, key=lambda v: v.weight).name
            result.at_first_growth = lab.assigned_at(result.events[0]["t"], first)  # type: ignore[arg-type]
        decisions = list(lab.decisions)
        page_file_writes = dict(lab.page_file_writes)
        paging: dict[str, dict[str, int]] = {}
        if config.page_file_mib:  # each guest's own account of its page file
            for name, c in consoles.items():
                text = c.run("paging").decode(errors="replace")
                paging[name] = {k: int(v) for k, v in re.findall(r"^([a-z-]+): (\d+)", text, re.M)}

    if together_at is not None:
        for t, d in decisions:
            if t >= together_at - 0.2 and d.host_short and d.operations:
                result.first_short_tick = {
                    "t": t,
                    "operations": {
                        op.vm: (1 if isinstance(op, Add) else -1) * mib_from_pages(op.pages)
                        for op in d.operations
                    },
                }
                break

    samples = read_csv(lab.csv_path)
    used = [
        sum(s.values.get(counter_path(n, PHYSICAL), 0.0) for n in names)
        for s in samples
        if all(counter_path(n, PHYSICAL) in s.values for n in names)
    ]
    result.peak_used_mib = max(used, default=0.0)
    for v in config.vms:
        series = [
            s.values[counter_path(v.name, PHYSICAL)]
            for s in samples
            if counter_path(v.name, PHYSICAL) in s.values
        ]
        h = history[v.name]
        peak_demand = max((p.demand or 0.0 for p in h), default=0.0)
        top = max((p.assigned for p in h), default=0.0)
        peak_t = next((p.t for p in h if p.assigned == top), -1.0)
        result.vms[v.name] = {
            "weight": v.weight,
            "minimum": v.minimum_mib,
            "lowest": min(series, default=0.0),
            "peak": max(series, default=0.0),
            "peak_visible": max(
                (s.values.get(counter_path(v.name, VISIBLE), 0.0) for s in samples), default=0.0
            ),
            "peak_demand": peak_demand,
            "peak_t": peak_t,
            "page_file_writes": page_file_writes.get(v.name, 0),
            "page_outs": paging.get(v.name, {}).get("page-outs", 0),
            "page_ins": paging.get(v.name, {}).get("page-ins", 0),
        }
    result.sum_of_peaks_mib = sum(v["peak"] for v in result.vms.values())
    result.csv = str(lab.csv_path)
    png = out / "contention.png"
    draw_chart(
        samples,
        [counter_path(n, PHYSICAL) for n in names],
        png,
        title=f"Contention: Physical Memory (weights {', '.join(f'{v.name}={v.weight}' for v in config.vms)}; "
        f"budget {config.budget_mib} MiB; measured on PVM)",
        y_max=config.budget_mib,
        y_label="MB",
    )
    result.png = str(png)
    (out / "events.json").write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    (out / "account.txt").write_text(result.account() + "\n")
    return result
