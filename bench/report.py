"""Generate docs/benchmarks.md from the benches' results (bench/results/<bench>.json).

Every figure in the doc's tables, and every "met" / "not met" of a goal, is computed here from
those files; each table is headed by the run it comes from (date, CPU model, kernel, KVM module,
Python, QEMU). `make bench` runs the benches and then this. Edit the prose here, not in the doc.

    python -m bench.report            # write docs/benchmarks.md
    python -m bench.report --check    # exit 1 if docs/benchmarks.md is not what the JSON gives
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
BENCHES = ("intercepts", "boot", "dynmem", "dynmem_host", "balancer", "migration")
#: Benches added since, reported after those (one name per line: parallel additions merge).
MORE_BENCHES = (
    "cluster",
    "smartpaging",
    "fuzz",
)
RUN_PREFIX = "_Run:_ "
DASH = "—"

Results = dict[str, dict[str, Any]]


def load(directory: Path = RESULTS) -> Results:
    """Every bench's result that exists in `directory`, by bench name."""
    out = {}
    for name in BENCHES + MORE_BENCHES:
        path = directory / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


# --- formatting ---------------------------------------------------------------------------


def num(x: float | int, digits: int | None = None) -> str:
    """A figure as the doc writes it: thousands grouped by spaces, `digits` decimals (default:
    none from 1 000 up, else 3 significant-ish)."""
    if digits is None:
        ax = abs(x)
        digits = 0 if ax >= 100 else 1 if ax >= 10 else 2 if ax >= 1 else 3
    s = f"{x:,.{digits}f}"
    return s.replace(",", " ")


def spread(
    s: dict[str, Any] | None, digits: int | None = None, unit: str = "", scale: float = 1
) -> str:
    """'median (min-max)', or the median alone when there was one sample; values / `scale`."""
    if not s:
        return DASH
    med = num(s["median"] / scale, digits) + unit
    if s.get("n", 1) <= 1 or s["min"] == s["max"]:
        return med
    lo, hi = num(s["min"] / scale, digits), num(s["max"] / scale, digits)
    return f"{med} ({lo} to {hi})" if s["min"] < 0 else f"{med} ({lo}-{hi})"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def text(s: str) -> str:
    """A message (e.g. QEMU's error) as one line that cannot break a table."""
    return " ".join(s.split()).replace("|", "\\|")


def met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def run_line(name: str, data: dict[str, Any]) -> str:
    """The run a table comes from: its file, when, and on what it was measured."""
    r = data["run"]
    module = r["kvm_module"]
    where = "measured on PVM" if "kvm_pvm" in module.split(",") else f"measured on {module}"
    quick = (
        " **Quick run (PYHV_BENCH_QUICK=1): a placeholder with fewer repetitions and sizes; "
        "`make bench` replaces it.**"
        if r.get("quick")
        else ""
    )
    return (
        f"{RUN_PREFIX}`bench/results/{name}.json`, {where}: date {r['date']}, "
        f"CPU model {r['cpu_model']} ({r['cpus']} CPUs), kernel {r['kernel']}, "
        f"KVM module {module}, Python {r['python']}, QEMU {r['qemu']}, commit {r['commit']}, "
        f"load average at start {num(r['load_average_at_start'][0], 2)}, "
        f"took {r['elapsed_s']} s.{quick}"
    )


def missing(name: str) -> list[str]:
    return [f"Not measured yet: run `make bench` (bench/results/{name}.json is missing).", ""]


# --- sections -----------------------------------------------------------------------------


def intercepts(d: dict[str, Any]) -> list[str]:
    f = d["figures"]
    qerr = text(d["qemu"]["error"]) if "error" in d["qemu"] else None
    out = [
        "Exits per second: a guest doing N port writes / MMIO writes / RDMSRs, each through the",
        "full intercept API with a trivial Python handler, on pyhv's C run loop and on its",
        "pure-Python loop (a process with `PYHV_NO_FASTRUN=1`); the same guest under a minimal C",
        "KVM_RUN loop; QEMU microvm (with KVM) on the same loops. "
        f"N = {num(d['n'], 0)} ({num(d['qemu_exits'], 0)} for QEMU, whose start-up is cancelled "
        f"out), {plural(d['repeats'], 'repetition')}, interleaved; median (min-max). The ratios and the ns "
        "per exit pyhv adds to the C loop (1/pyhv - 1/C) are taken per repetition.",
        "",
        run_line("intercepts", d),
        "",
    ]
    rows = []
    names = {"io": "port write", "mmio": "MMIO write", "msr": "RDMSR"}
    for kind, label in names.items():
        if kind == "msr":
            qemu, vs_qemu = "— (QEMU does not exit MSRs to user space)", DASH
        elif qerr:
            qemu = vs_qemu = f"not run: {qerr}"
        else:
            qemu = spread(f[f"{kind}_qemu_per_s"], 0)
            vs_qemu = spread(f[f"{kind}_ratio_vs_qemu"], 3)
        rows.append(
            [
                label,
                spread(f[f"{kind}_pyhv_per_s"], 0),
                spread(f[f"{kind}_pyhv_python_loop_per_s"], 0),
                spread(f[f"{kind}_c_per_s"], 0),
                qemu,
                spread(f[f"{kind}_ratio_vs_c"], 3),
                spread(f[f"{kind}_ns_per_exit_over_c"], 0),
                vs_qemu,
                # the flight recorder on (pyhv.trace): every exit an event
                spread(f[f"{kind}_ratio_vs_c_tracing_on"], 3)
                if f"{kind}_ratio_vs_c_tracing_on" in f
                else DASH,
            ]
        )
    out += table(
        [
            "exit",
            "pyhv (C run loop) /s",
            "pyhv (pure-Python loop) /s",
            "C loop /s",
            "QEMU /s",
            "pyhv / C",
            "ns per exit pyhv adds to C",
            "pyhv / QEMU",
            "pyhv tracing on / C",
        ],
        rows,
    )
    ratios = {k: f[f"{k}_ratio_vs_c"]["median"] for k in names}
    c_ok = all(v >= 0.9 for v in ratios.values())
    out += [
        "",
        f"Port loop floors: a bare Python KVM_RUN loop (no API) "
        f"{spread(f['io_python_floor_per_s'], 0)} /s (pyhv / floor "
        f"{spread(f['io_ratio_vs_python_floor'], 2)}); pyhv without handler timing "
        f"{spread(f['io_pyhv_untimed_per_s'], 0)} /s (/ C {spread(f['io_untimed_ratio_vs_c'], 2)}).",
        "",
        "Goals: >= 0.9 of the C loop at the median: "
        + met(c_ok)
        + " ("
        + ", ".join(f"{names[k]} {num(v, 3)}" for k, v in ratios.items())
        + ")",
    ]
    if qerr:
        out[-1] += f"; at or above QEMU: not judged (QEMU did not run: {qerr})."
    else:
        q = {k: f[f"{k}_ratio_vs_qemu"]["median"] for k in ("io", "mmio")}
        out[-1] += (
            "; at or above QEMU at the median: "
            + met(all(v >= 1 for v in q.values()))
            + " ("
            + ", ".join(f"{names[k]} {num(v, 3)}" for k, v in q.items())
            + ")."
        )
    tracing = d.get("io_ratio_vs_c_tracing_on")
    out += [
        "",
        "What pyhv adds per exit beyond the C loop is releasing and retaking the GIL and calling "
        "the Python handler; on PVM the kernel's exit path (emulated CPL0) dominates both.",
        "With the flight recorder off (the other columns) nothing on the exit path tests for it; "
        '"tracing on" is the same loop while `pyhv vm trace` watches: each handler wrapped, '
        "timed and turned into an event in the VM's ring and a bounded stream (docs/trace.md).",
        "",
        f"JSON keys of issue 10: `io_ratio_vs_c` {d['io_ratio_vs_c']}, `io_ratio_vs_qemu` "
        f"{d['io_ratio_vs_qemu']}, `io_ratio_vs_c_tracing_on` "
        + (str(tracing) if tracing is not None else "null (no flight recorder yet)")
        + ".",
        "",
    ]
    return out


def boot(d: dict[str, Any]) -> list[str]:
    out = [
        "Process start -> first serial byte / -> shell prompt, pyhv and QEMU taking turns, "
        f"{d['runs']} runs each; median (min-max), ms. QEMU runs with KVM "
        "(`-accel kvm -cpu host,-arch-capabilities`) or its row says why it could not.",
        "",
        run_line("boot", d),
        "",
    ]
    rows = []
    for label, key in (
        ("`pyhv run --memory 512M`", "pyhv_run"),
        ("`qemu-system-x86_64 -M microvm -kernel pyhv-guest.elf` (PVH)", "qemu_microvm"),
    ):
        r = d[key]
        if "error" in r:
            rows.append([label, f"not run: {text(r['error'])}", DASH])
        else:
            rows.append([label, spread(r["first_byte_ms"], 1), spread(r["prompt_ms"], 1)])
    out += table(["", "first byte (ms)", "prompt (ms)"], rows)
    fl = d["floors"]
    ratio = d.get("first_byte_ratio_pyhv_over_qemu")
    out += [
        "",
        f"Floors of pyhv's figure: Python start {spread(fl['python_start_ms'], 1)} ms, + import "
        f"pyhv.hypervisor {spread(fl['import_hypervisor_ms'], 1)} ms, + every boot-path import "
        f"{spread(fl['import_boot_path_ms'], 1)} ms (bytecode written: "
        f"{'yes' if d['bytecode_written'] else 'no, each process compiles pyhv from source'}).",
        "",
    ]
    out += [
        "QEMU's PVH entry makes the guest build its page tables at (emulated) CPL0, which is much "
        "of QEMU's time here; most of pyhv's is Python start-up and imports (the floors above).",
        "",
    ]
    if ratio is None:
        out.append("Goals: not judged (no QEMU figure).")
    else:
        out.append(
            f"`first_byte_ratio_pyhv_over_qemu` {ratio}. Goals: first byte no later than QEMU "
            f"microvm's: {met(ratio <= 1)}; <= 0.5x QEMU's (issue 10): {met(ratio <= 0.5)}."
        )
    return [*out, ""]


def dynmem(d: dict[str, Any] | None, h: dict[str, Any] | None) -> list[str]:
    out = [
        "End to end with the reference guest (request -> the guest's last answer); balloon and "
        "unballoon repeated (the guest touches its free memory again before each balloon), "
        "hot-add once per size; median (min-max).",
        "",
    ]
    if d is None:
        out += missing("dynmem")
    else:
        sizes = list(d["sizes"])
        out += [run_line("dynmem", d), ""]
        s = d["sizes"]

        def cell(size: str, key: str, rate: str | None = None) -> str:
            v = spread(s[size][key], 1, " ms")
            if rate:
                v += f", {num(s[size][rate]['median'] / 1e6, 2)} M pages/s"
            return v

        rows = [
            ["balloon", *[cell(z, "balloon_ms", "balloon_pages_per_s") for z in sizes]],
            ["unballoon", *[cell(z, "unballoon_ms") for z in sizes]],
            ["hot-add (once)", *[cell(z, "hot_add_ms") for z in sizes]],
            [
                "host-side release within the balloon (memfd hole punching)",
                *[spread(s[z]["release_GiB_per_s"], 1, " GiB/s") for z in sizes],
            ],
        ]
        out += table(["operation", *[z.replace("MiB", " MiB") for z in sizes]], rows)
        out.append("")
    out += [
        "The host-side release alone (`bench/dynmem_host.py`, no guest): the memory manager "
        "releasing 1 GiB of populated guest RAM, every other range, 510 ranges per call; and "
        "the kernel's floor (the same holes punched directly).",
        "",
    ]
    if h is None:
        out += missing("dynmem_host")
    else:
        out += [run_line("dynmem_host", h), ""]
        best = h["release_2MiB_scattered_GiB_per_s"]
        worst = h["release_4KiB_scattered_GiB_per_s"]
        out += table(
            ["pattern", "memory manager (GiB/s)", "fallocate alone (GiB/s)"],
            [
                [
                    "scattered 2 MiB ranges (best)",
                    spread(best, 2),
                    spread(h["raw_punch_2MiB_scattered_GiB_per_s"], 2),
                ],
                ["scattered 4 KiB pages (worst: one fallocate each)", spread(worst, 2), DASH],
            ],
        )
        goal = h["goal_release_GiB_per_s"]
        out += [
            "",
            f"Goal: release >= {goal} GiB/s. Best pattern: {met(best['median'] >= goal)} at the "
            f"median ({num(best['median'], 2)}), "
            f"{'in every run' if best['min'] >= goal else 'not in every run'} "
            f"(min {num(best['min'], 2)}); worst pattern: {met(worst['median'] >= goal)} "
            f"({num(worst['median'], 2)} GiB/s).",
            "",
        ]
    out += ["The VMBus ring:", ""]
    rows = []
    if d is not None:
        r = d["ring"]
        rows += [
            [
                f"whole round trip with the real guest ({r['rounds']} balloon + unballoon rounds; "
                "the guest's part is emulated CPL0 code)",
                f"{spread(r['round_trip_us'], 0, ' µs')}, p90 {num(r['round_trip_us_p90'], 0)} µs",
            ],
            [
                "host's share with the real guest (doorbell seen -> reply posted)",
                spread(r["host_share_us"], 1, " µs"),
            ],
            ["packets/s with the real guest", num(r["packets_per_s"], 0)],
        ]
    if h is not None:
        rows += [
            [
                "host ring alone, Python peer: host writes / batched reads",
                f"{num(h['host_write_pkts_per_s'], 0)} / {num(h['host_read_pkts_per_s'], 0)} "
                "packets/s",
            ],
            [
                "host ring alone, Python peer: host part of a round trip",
                f"{num(h['host_round_trip_us_median'], 1)} µs",
            ],
            [
                "VSP: one balloon response of 510 ranges decoded and checked",
                f"{num(h['vsp_balloon_response_510_ranges_us'], 0)} µs",
            ],
        ]
    out += table(["", "figure"], rows)
    parts = []
    if d is not None:
        share = d["ring"]["host_share_us"]["median"]
        parts.append(f"with the real guest {met(share <= 50)} ({num(share, 1)} µs)")
    if h is not None:
        rt = h["host_round_trip_us_median"]
        parts.append(f"with a Python peer {met(rt <= 50)} ({num(rt, 1)} µs)")
    out += [
        "",
        "Goal: host share of a round trip <= 50 µs: " + "; ".join(parts) + ". With the real "
        "guest the share includes the doorbell thread's wake-up and the GIL shared with the VP "
        "thread.",
        "",
    ]
    if d is not None and "hint" in d and "burst" in d:
        out += dynmem_hints_and_bursts(d["hint"], d["burst"], d.get("hint_huge_pages"))
    if d is not None and d.get("hot_remove"):
        out += dynmem_hot_remove(d["hot_remove"])
    return out


def dynmem_hot_remove(hr: dict[str, Any]) -> list[str]:
    """Hot-remove of a whole hot-added region (issue 14, item 3)."""
    rows = []
    for size, r in hr.items():
        rows.append(
            [
                f"hot-remove of a {text(size)} region the guest touched and freed: request -> "
                "last answer handled (region unmapped)",
                spread(r["hot_remove_ms"], 1, " ms"),
                spread(r["hot_remove_pages_per_s"], 0, " pages/s"),
                spread(r["host_freed_MiB"], 0, " MiB"),
            ]
        )
    out = [
        "Hot-remove (DM protocol 2.0): the guest gives a whole hot-added region back, the "
        "worker closes its memory slot and memfd.",
        "",
    ]
    out += table(["operation", "time", "rate", "host memory freed"], rows)
    return out + [""]


def _hint_rows(hint: dict[str, Any], ram: str) -> list[list[str]]:
    rows = [
        [
            f"hint{ram}: {num(hint['freed_MiB'], 0)} MiB freed in a {num(hint['guest_MiB'], 0)} "
            "MiB guest, hint received -> memory off the host (memfd blocks)",
            spread(hint["hint_to_gone_ms"], 1, " ms"),
        ],
        [
            f"hint{ram}: the host's discard alone (fallocate PUNCH_HOLE)",
            spread(hint["host_discard_ms"], 1, " ms"),
        ],
    ]
    if "host_discard_cpu_ms" in hint:
        rows.append(
            [
                f"hint{ram}: the discard's CPU time (the kernel's work; a loaded host stretches "
                "the wall-clock figure)",
                spread(hint["host_discard_cpu_ms"], 1, " ms"),
            ]
        )
    return rows + [
        [
            f"hint{ram}: kill typed -> memory off the host (console included)",
            spread(hint["kill_to_gone_ms"], 1, " ms"),
        ],
        [
            f"hint{ram}: the guest's round trip (its clock, 10 ms ticks)",
            spread(hint["guest_round_trip_ms"], 0, " ms"),
        ],
        [f"hint{ram}: host memory freed", spread(hint["host_freed_MiB"], 0, " MiB")],
    ]


def dynmem_hints_and_bursts(
    hint: dict[str, Any], burst: dict[str, Any], huge: dict[str, Any] | None = None
) -> list[str]:
    """Free-page hints (RAM in 4 KiB memfd pages, and in 2 MiB pages with `huge_pages` when
    measured) and the answer to a burst (issue 14, items 4 and 5)."""
    gone = hint["hint_to_gone_ms"]["median"]
    added = burst["report_to_added_ms"]
    decision = burst["report_to_decision_ms"]
    out = [
        "Free-page hints and bursts (pyhv's FREE_PAGE_HINT; the guest's burst reports and the "
        "balancer's early tick):",
        "",
    ]
    out += table(
        ["", "figure"],
        [
            *_hint_rows(hint, ""),
            *(_hint_rows(huge, " (huge_pages)") if huge is not None else []),
            [
                f"burst: {num(burst['burst_MiB'], 0)} MiB committed, the burst's report -> memory "
                "added",
                f"{num(added, 1)} ms",
            ],
            [
                "burst: report -> the balancer's decision",
                "none" if decision is None else f"{num(decision, 1)} ms",
            ],
            [
                "burst: testlimit typed -> its report at the VMMS",
                f"{num(burst['typed_to_report_ms'], 1)} ms",
            ],
            [
                "burst: the guest's longest wait for memory / all allocated after (its clock)",
                f"{num(burst['guest_longest_wait_ms'], 0)} ms / "
                f"{num(burst['guest_all_allocated_ms'], 0)} ms",
            ],
        ],
    )
    per_page = hint.get("host_discard_cpu_ms", hint["host_discard_ms"])["median"]
    goal = f"Goals: hint-return <= {num(hint['goal_ms'], 0)} ms: "
    if huge is not None:
        fast = huge["hint_to_gone_ms"]["median"]
        goal += (
            f"with huge_pages {met(fast <= huge['goal_ms'])} ({num(fast, 1)} ms: 2 MiB folios), "
            f"with 4 KiB memfd pages {met(gone <= hint['goal_ms'])} ({num(gone, 1)} ms"
        )
    else:
        goal += f"{met(gone <= hint['goal_ms'])} ({num(gone, 1)} ms"
    out += [
        "",
        f"{goal}; the discard there is the kernel freeing 4 KiB shmem pages, "
        f"{num(per_page * 1000 / (hint['freed_MiB'] * 256), 2)} µs of CPU each here); "
        "memory added <= "
        f"{num(burst['goal_ms'], 0)} ms after the burst's report: {met(added <= burst['goal_ms'])} "
        f"({num(added, 1)} ms).",
        "",
    ]
    return out


E2E_COLUMNS = (
    ("commit_to_report_s", "commit -> report"),
    ("report_to_first_add_s", "report -> first add"),
    ("commit_to_under_target_s", "commit -> under target"),
    ("first_to_second_jump_s", "second jump after first"),
    ("end_to_trim_start_s", "testlimit end -> trim starts"),
    ("end_to_trimmed_s", "-> trimmed"),
)
E2E_RUNS = {
    "default_1.0": "time scale 1 (the book's)",
    "fast_0.1": "time scale 0.1",
    "fast_0.1_unpaced": "time scale 0.1, no add pacing",
}


def balancer(d: dict[str, Any]) -> list[str]:
    host = d["run"]["cpu_model"]
    out = [
        f"Decision time per tick (one warm-up, then {d['repeat']} ticks; median (min-max), ms). "
        "Fleets: *steady* (1 % of VMs' demand just moved) and *churn* (most VMs get an "
        "operation); host memory: *roomy* or *short* (weights and reclaim at work); `decide` "
        "over per-VM dataclasses, `decide_table` over a VmTable. Every row was measured on the "
        "host named in its first column.",
        "",
        run_line("balancer", d),
        "",
    ]
    rows = []
    worst = {"decide": 0.0, "table": 0.0}
    for n, case in d["vms"].items():
        for fleet in ("steady", "churn"):
            for mem in ("roomy", "short"):
                dec = case[f"{fleet}_{mem}_decide_ms"]
                tab = case[f"{fleet}_{mem}_table_ms"]
                if n == "10000":
                    worst["decide"] = max(worst["decide"], dec["median"])
                    worst["table"] = max(worst["table"], tab["median"])
                rows.append([host, num(int(n), 0), fleet, mem, spread(dec, 2), spread(tab, 2)])
    out += table(
        ["host (CPU model)", "VMs", "fleet", "host memory", "`decide` ms", "`decide_table` ms"],
        rows,
    )
    goal = d["goal_ms_10000"]
    out += [
        "",
        f"Goal: 10 000 VMs <= {num(goal, 0)} ms per tick: `decide_table` {met(worst['table'] <= goal)} "
        f"(slowest case {num(worst['table'], 2)} ms), `decide` {met(worst['decide'] <= goal)} "
        f"(slowest case {num(worst['decide'], 2)} ms).",
        "",
    ]
    e2e = d["end_to_end"]
    if not e2e:
        return [*out, "End to end with the reference guest: not run (no /dev/kvm).", ""]
    out += [
        "End to end with the reference guest, the book's experiment through the VMMS's own "
        "balancer loop (seconds, one run each; time scale 0.1 shortens the book's lazy delays):",
        "",
    ]
    rows = []
    for key, label in E2E_RUNS.items():
        if key in e2e:
            rows.append(
                [host, label]
                + [num(e2e[key][c], 2) if c in e2e[key] else DASH for c, _ in E2E_COLUMNS]
            )
    out += table(["host (CPU model)", "run", *[h for _, h in E2E_COLUMNS]], rows)
    firsts = {k: v["report_to_first_add_s"] for k, v in e2e.items()}
    g = d["end_to_end_goal_report_to_first_add_s"]
    out += [
        "",
        f"Goal: first add <= {num(g, 0)} s after the report that shows the spike: "
        f"{met(all(v <= g for v in firsts.values()))} (slowest {num(max(firsts.values()), 2)} s)."
        + (
            ""
            if "default_1.0" in e2e
            else " The book's time scale 1 was not run (quick run or --fast-only)."
        ),
        "",
    ]
    return out


def nonzero_cell(r: dict[str, Any]) -> str:
    """The row's non-zero memory at the start, with each side's median where they differ."""
    mib = r["nonzero_bytes_at_start"] / 2**20
    sides = [
        (name, r[side]["nonzero_bytes_at_start"]["median"] / 2**20)
        for name, side in (("pyhv", "pyhv"), ("QEMU", "qemu"))
        if "nonzero_bytes_at_start" in r[side]
    ]
    if all(abs(v - mib) <= 0.01 * mib for _, v in sides):
        return f"{num(mib, 1)} MiB"
    return f"{num(mib, 1)} MiB ({', '.join(f'{n} {num(v, 1)}' for n, v in sides)})"


def migration(d: dict[str, Any]) -> list[str]:
    conv = d["convergence"]
    p, q = conv["pyhv"], conv["qemu"]
    same = (
        p["auto_converge"] == q["auto-converge"]
        and round(p["throttle_initial"] * 100) == q["cpu-throttle-initial"]
        and round(p["throttle_step"] * 100) == q["cpu-throttle-increment"]
        and round(p["throttle_max"] * 100) == q["max-cpu-throttle"]
    )
    bw = d["loopback_bytes_per_s"]
    qerr = d["qemu"].get("error")
    # results from before the bench timed QEMU's downtime from its events have no such column
    events = any("downtime_events_ms" in r.get("qemu", {}) for r in d["rows"])
    # pyhv's own figure for QEMU's window (every VP parked -> just before they run), since
    # 2026-12-06: the ratio then divides that matched pair
    pyhv_events = any("downtime_events_ms" in r.get("pyhv", {}) for r in d["rows"])
    out = [
        "pyhv between two worker processes vs QEMU (with KVM) between two QEMU processes, "
        f"loopback, no bandwidth limit, downtime limit {d['downtime_limit_ms']} ms on both, same "
        f"guest image and workload; {plural(d['repeats'], 'repetition')} per row, median "
        "(min-max); "
        + (
            "QEMU's downtime is measured as pyhv's: its VM paused at the source (QMP `STOP` "
            "event) to running at the destination (`RESUME`), from the events' µs timestamps; "
            "QEMU sends `STOP` once its vCPUs are paused and `RESUME` just before they run (its "
            "vCPUs' pausing is outside that window). QEMU's own reported figure (whole ms, from "
            "a ms clock, at the source alone) is beside it and not compared. "
            if events
            else "QEMU reports downtime in whole ms. "
        )
        + (
            "pyhv's downtime is shown twice: in full (from the pause request, the VPs' parking "
            "included: what the guest sees) and over QEMU's window (every VP parked to just "
            "before they run at the destination); `pyhv downtime / QEMU's` divides that "
            "matched pair. "
            if pyhv_events and events
            else ""
        )
        + f"Convergence: auto-converge {'ON' if p['auto_converge'] else 'OFF'} on both sides, "
        f"throttle {round(p['throttle_initial'] * 100)} % first, "
        f"+{round(p['throttle_step'] * 100)} % per step, at most "
        f"{round(p['throttle_max'] * 100)} %"
        + ("" if same else " for pyhv — **QEMU's settings differ**")
        + f". pyhv sends pages over {plural(d.get('pyhv_streams', 1), 'TCP stream')} (a "
        "sending thread each), QEMU over one.",
        "",
        "The wire limit of a row is the same fixed figure for both: the guest's distinct "
        "non-zero memory at the start of the migration (4 KiB pages not all zero, each counted "
        "once, read from the source's guest RAM just before the migration starts: pyhv's memfd, "
        "QEMU's anonymous mapping through /proc/PID/mem; the median over the row's pyhv and QEMU "
        "migrations) divided by the loopback bandwidth of "
        f"this run: {spread(bw, 2, ' GB/s', 1e9)}, {bw['n']} TCP transfers of "
        f"{d['wire_bytes_per_transfer'] >> 20} MiB between two processes, one before each row's "
        "migrations and one after the last.",
        "",
        run_line("migration", d),
        "",
    ]
    rows = []
    down_rows, limit_rows = [], []
    for r in d["rows"]:
        size = r["memory"].replace("M", " MiB").replace("G", " GiB")
        dirty = f"{r['dirty_mib']} MiB" if r["dirty_mib"] else "idle"
        if "skipped" in r:
            continue
        pp, qq = r["pyhv"], r["qemu"]
        if "error" in qq:
            qcells = [f"not run: {text(qq['error'])}", DASH, DASH, DASH]
        else:
            qe = qq.get("downtime_events_ms")
            qcells = [
                spread(qq["total_s"], 3, " s"),
                spread(qq["downtime_ms"], 0, " ms"),
                num(qq["total_over_limit"]),
                DASH if qe is None else spread(qe, 2, " ms"),
            ]
        ratio = r["downtime_pyhv_over_qemu"]
        rows.append(
            [
                size,
                dirty,
                nonzero_cell(r),
                f"{num(r['wire_limit_s'] * 1000)} ms",
                spread(pp["total_s"], 3, " s"),
                spread(pp["downtime_ms"], 1, " ms"),
                *([spread(pp["downtime_events_ms"], 2, " ms")] if pyhv_events else []),
                qcells[0],
                *([qcells[3]] if events else []),
                qcells[1],
                num(pp["total_over_limit"]),
                qcells[2],
                DASH if ratio is None else num(ratio, 2),
            ]
        )
        if ratio is not None:
            down_rows.append((f"{size} {dirty}", ratio))
        limit_rows.append((f"{size} {dirty}", pp["total_over_limit"]))
    out += table(
        [
            "guest",
            "dirty set",
            "non-zero at start",
            "wire limit",
            "pyhv total",
            "pyhv downtime",
            *(["pyhv downtime (QEMU's window)"] if pyhv_events else []),
            "QEMU total",
            *(["QEMU downtime (STOP -> RESUME)", "QEMU downtime (reported)"] if events else []),
            *([] if events else ["QEMU downtime"]),
            "pyhv total / limit",
            "QEMU total / limit",
            "pyhv downtime / QEMU's"
            + (
                " (same window)"
                if pyhv_events and events
                else " (STOP -> RESUME)"
                if events
                else ""
            ),
        ],
        rows,
    )
    out.append("")
    if qerr or not down_rows:
        out.append("Goals: downtime <= QEMU's: not judged (no QEMU figures).")
    else:
        over = [name for name, v in down_rows if v > 1]
        out.append(
            f"Goals: downtime <= QEMU's in every row: {met(not over)}"
            + (f" (above QEMU's in: {', '.join(over)})" if over else "")
            + ";"
        )
    far = [name for name, v in limit_rows if v > 1.3]
    out += [
        f"total time <= 1.3x the wire limit: {met(not far)}"
        + (f" (not in: {', '.join(far)})" if far else "")
        + ". An idle guest's wire limit is tiny (its non-zero memory is the guest image), so its "
        "ratio measures the fixed cost of a migration (connection, handshake, the VM created on "
        "the destination). With a working set, the wire is not all the time costs: the guest's "
        "`dirty` loop takes one of the two cores, the destination backs every page it receives "
        "with fresh memory, and the passes after the first resend what the guest rewrote.",
        "",
    ]
    busy = d.get("loopback_one_core_busy_bytes_per_s")
    held = [r for r in d["rows"] if "wire_limit_one_core_busy_s" in r]
    if busy and held:
        out += [
            f"The same TCP transfer with one of the host's {d.get('cpus', '?')} cores held by a "
            f"spinning process, as the `dirty` loop holds one: {spread(busy, 2, ' GB/s', 1e9)}. "
            "Total over that limit (pyhv pre-copy, pyhv post-copy, QEMU pre-copy): "
            + "; ".join(
                f"{r['memory'].replace('M', ' MiB').replace('G', ' GiB')} {r['dirty_mib']} MiB "
                f"{num(r['pyhv']['total_over_busy_limit'])}, "
                f"{num(r['pyhv_postcopy']['total_over_busy_limit'])}, "
                + (
                    DASH
                    if "total_over_busy_limit" not in r["qemu"]
                    else num(r["qemu"]["total_over_busy_limit"])
                )
                for r in held
            )
            + ".",
            "",
        ]
    return out + _migration_sealing(d) + _migration_postcopy(d) + _migration_hybrid(d)


def _migration_postcopy(d: dict[str, Any]) -> list[str]:
    """Post-copy rows (pyhv's over one stream, QEMU's postcopy-ram) where the run has them
    (results without them show nothing)."""
    rows = []
    events = any("postcopy_downtime_pyhv_over_qemu" in r for r in d["rows"])
    for r in d["rows"]:
        if "skipped" in r or "pyhv_postcopy" not in r:
            continue
        size = r["memory"].replace("M", " MiB").replace("G", " GiB")
        c, q = r["pyhv_postcopy"], r.get("qemu_postcopy")
        rows.append(
            [
                f"{size}, " + (f"{r['dirty_mib']} MiB dirty" if r["dirty_mib"] else "idle"),
                spread(c["total_s"], 3, " s"),
                spread(c["downtime_ms"], 1, " ms"),
                DASH
                if c["blocktime_p50_ms"] is None
                else f"{num(c['blocktime_p50_ms'], 2)} / {num(c['blocktime_p99_ms'], 2)} ms",
                DASH if c["faults"] is None else num(c["faults"], 0),
                DASH if c["requested_pages"] is None else num(c["requested_pages"], 0),
                num(c["total_over_limit"]),
                DASH if q is None else spread(q["total_s"], 3, " s"),
                DASH if q is None else f"{num(q['blocktime_total_ms'], 1)} ms",
                DASH if q is None or "total_over_limit" not in q else num(q["total_over_limit"]),
                *(_window_cells(c, q, r.get("postcopy_downtime_pyhv_over_qemu")) if events else []),
            ]
        )
    if not rows:
        return []
    out = [
        "The same guests moved by post-copy (`postcopy`: the VM runs at the destination at once, "
        "its pages fetched as it touches them; one stream) beside QEMU's postcopy-ram (switched "
        "after its first pass):",
        "",
    ]
    out += table(
        [
            "",
            "pyhv post-copy total",
            "pyhv post-copy downtime",
            "blocktime p50 / p99",
            "faults",
            "pages on request",
            "pyhv total / limit",
            "QEMU post-copy total",
            "QEMU blocktime total",
            "QEMU total / limit",
            *(WINDOW_HEADERS if events else []),
        ],
        rows,
    )
    return out + [""]


#: The downtime in the window QEMU's QMP events span (every vCPU parked -> just before they
#: run), on both sides, and their ratio: the post-copy and hybrid tables' last columns.
WINDOW_HEADERS = [
    "pyhv downtime (QEMU's window)",
    "QEMU downtime (STOP -> RESUME)",
    "pyhv / QEMU (same window)",
]


def _window_cells(
    mine: dict[str, Any], theirs: dict[str, Any] | None, ratio: float | None
) -> list[str]:
    p_ev = mine.get("downtime_events_ms")
    q_ev = None if theirs is None else theirs.get("downtime_events_ms")
    return [
        DASH if p_ev is None else spread(p_ev, 2, " ms"),
        DASH if q_ev is None else spread(q_ev, 2, " ms"),
        DASH if ratio is None else num(ratio, 2),
    ]


def _migration_hybrid(d: dict[str, Any]) -> list[str]:
    """Hybrid rows (pre-copy, then post-copy after the same number of passes on both sides)
    where the run has them (results without them show nothing)."""
    rows = []
    after = None
    events = any("postcopy_downtime_pyhv_over_qemu" in r for r in d["rows"])
    for r in d["rows"]:
        if "skipped" in r or "pyhv_hybrid" not in r:
            continue
        size = r["memory"].replace("M", " MiB").replace("G", " GiB")
        h, q = r["pyhv_hybrid"], r.get("qemu_hybrid")
        after = h["postcopy_after"]
        n = h["total_s"]["n"]
        block = (
            DASH
            if h["blocktime_p50_ms"] is None
            else f"{num(h['blocktime_p50_ms'], 2)} / {num(h['blocktime_p99_ms'], 2)} ms"
        )
        ratio = r.get("hybrid_downtime_pyhv_over_qemu")
        if q is None:
            qcells = [DASH] * 5
        else:
            qcells = [
                spread(q["total_s"], 3, " s"),
                DASH if q["downtime_ms"] is None else spread(q["downtime_ms"], 0, " ms"),
                f"{q['switched_runs']} of {q['total_s']['n']}",
                f"{num(q['blocktime_total_ms'], 1)} ms",
                num(q["total_over_limit"]),
            ]
        rows.append(
            [
                f"{size}, " + (f"{r['dirty_mib']} MiB dirty" if r["dirty_mib"] else "idle"),
                spread(h["total_s"], 3, " s"),
                spread(h["downtime_ms"], 1, " ms"),
                f"{h['switched_runs']} of {n}",
                block,
                num(h["total_over_limit"]),
                *qcells,
                *(
                    _window_cells(h, q, ratio)
                    if events
                    else [DASH if ratio is None else num(ratio, 2)]
                ),
            ]
        )
    if not rows:
        return []
    hy_bw = d.get("hybrid", {}).get("bandwidth_bytes_per_s", 0)
    link = (
        f"over a link limited to {num(hy_bw / 2**20, 0)} MiB/s on both sides (pyhv's `bandwidth`, "
        "QEMU's `max-bandwidth`: unlimited, loopback carries these working sets faster than the "
        "guest rewrites them and neither side would switch); "
        if hy_bw
        else "with no link limit; "
    )
    out = [
        f"Hybrid, {link}"
        f"pre-copy, then post-copy once {after} pass{'' if after == 1 else 'es'} ended, "
        "unless the rest already fits the downtime limit (then QEMU ends by pre-copy; pyhv "
        "too, unless pre-copy's final pause would be longer than a switch's: "
        "`postcopy_switch_downtime`, 5 ms): pyhv "
        f"`postcopy` with `postcopy_after={after}` over one stream, QEMU postcopy-ram with "
        "`migrate-start-postcopy` issued once its dirty bitmap was synced after that many "
        'passes; the same convergence settings. "switched" counts the runs that went '
        "post-copy; the blocktime is of those (QEMU 7.2 gives only a total, and no downtime "
        "once it switched); total / limit divides by the row's fixed wire limit, as above:",
        "",
    ]
    out += table(
        [
            "",
            "pyhv hybrid total",
            "pyhv hybrid downtime",
            "pyhv switched",
            "blocktime p50 / p99",
            "pyhv total / limit",
            "QEMU hybrid total",
            "QEMU hybrid downtime (reported)" if events else "QEMU hybrid downtime",
            "QEMU switched",
            "QEMU blocktime total",
            "QEMU total / limit",
            *(WINDOW_HEADERS if events else ["pyhv downtime / QEMU's"]),
        ],
        rows,
    )
    return out + [""]


def _migration_sealing(d: dict[str, Any]) -> list[str]:
    """What the stream's sealing costs: each row authenticated (the default) and encrypted,
    and the stream alone against the raw socket (results without them show nothing)."""
    out: list[str] = []
    rows = []
    for r in d["rows"]:
        if "skipped" in r or "pyhv_encrypted" not in r:
            continue
        size = r["memory"].replace("M", " MiB").replace("G", " GiB")
        e = r["pyhv_encrypted"]
        rows.append(
            [
                f"{size}, " + (f"{r['dirty_mib']} MiB dirty" if r["dirty_mib"] else "idle"),
                spread(r["pyhv"]["total_s"], 3, " s"),
                spread(e["total_s"], 3, " s"),
                spread(r["pyhv"]["downtime_ms"], 1, " ms"),
                spread(e["downtime_ms"], 1, " ms"),
                num(r["encrypted_total_over_authenticated"], 2),
            ]
        )
    if rows:
        out += [
            "The same migrations with the stream encrypted (`--encrypt`: AES-256-GCM over each "
            "frame's payload) beside the default, where every frame is authenticated (GMAC) but "
            "readable on the wire; the same repetitions, taking turns:",
            "",
        ]
        out += table(
            [
                "",
                "authenticated total",
                "encrypted total",
                "authenticated downtime",
                "encrypted downtime",
                "encrypted / authenticated",
            ],
            rows,
        )
        out.append("")
    st = d.get("stream")
    if st:
        out += [
            f"The stream alone on loopback: {st['frame_bytes'] >> 20} MiB PAGES frames of random "
            "bytes sealed as after the handshake, to a process that checks each one, against the "
            "raw socket's bulk transfer (the same sender and sink otherwise):",
            "",
        ]
        out += table(
            ["", "raw TCP", "authenticated (GMAC)", "encrypted (AES-256-GCM)"],
            [
                [
                    "page bytes/s",
                    spread(st["raw_tcp_bytes_per_s"], 2, " GB/s", 1e9),
                    spread(st["authenticated_bytes_per_s"], 2, " GB/s", 1e9),
                    spread(st["encrypted_bytes_per_s"], 2, " GB/s", 1e9),
                ],
                [
                    "share of raw TCP",
                    DASH,
                    num(st["authenticated_over_raw"], 2),
                    num(st["encrypted_over_raw"], 2),
                ],
            ],
        )
        out.append("")
    return out


def fuzz(d: dict[str, Any]) -> list[str]:
    per = d["per_decoder"]
    memory = d["memory_checked"]
    out = [
        "Every decoder a guest or a peer reaches (tests/support/fuzz, docs/security.md) fed its "
        f"valid seeds and then mutated ones for {num(d['seconds_per_decoder'])} s each (seed "
        f"{d['seed']}), one after the other in one Python process. A crash is an exception the "
        "decoder does not declare, a hang (an input over 2 s) or a memory blowup (32 MiB for "
        f"one input, watched by {memory}); the HTTP row sends whole requests as raw bytes to a "
        "live `pyhv vmms serve` Unix socket.",
        "",
        run_line("fuzz", d),
        "",
    ]
    rows = [
        [name, num(r["seeds"], 0), num(r["inputs"], 0), num(r["inputs_per_s"], 0),
         num(r["crashes"], 0)]
        for name, r in per.items()
    ]  # fmt: skip
    out += table(["decoder", "seeds", "inputs", "inputs/s", "crashes"], rows)
    out += [
        "",
        f"Goal: no crash: {met(d['crashes'] == 0)} ({num(d['crashes'], 0)} in "
        f"{num(d['inputs'], 0)} inputs over {plural(d['decoders'], 'decoder')}).",
        "",
    ]
    for name, r in per.items():
        for c in r["distinct_crashes"]:
            out.append(f"- {name}: {c['kind']}: {text(c['detail'])}")
    if any(r["distinct_crashes"] for r in per.values()):
        out.append("")
    out += ["What each decoder is:", ""]
    out += [f"- `{name}`: {r['what']}" for name, r in per.items()]
    return [*out, ""]


INTRO = [
    "# Benchmark results",
    "",
    "<!-- Generated by `python -m bench.report` from bench/results/*.json (which the benches",
    "write). Do not edit: change bench/report.py or rerun `make bench`. -->",
    "",
    "Every figure here was **measured on PVM** unless its run line says otherwise: a VM whose",
    "`/dev/kvm` is `kvm_pvm` (nested virtualization by shadow paging; guest CPL0 code is",
    "emulated at ~1.4 M instructions/s, CPL3 runs natively). Each table is generated from the",
    "JSON a bench wrote, and headed by its run: the date (UTC), CPU model, kernel, KVM module,",
    "Python and QEMU it was measured with. Figures are medians with min-max over repetitions,",
    "never best-of; this machine is shared, so they move run to run. Each bench measures its",
    "references (C loop, QEMU, the loopback wire) in the same run, interleaved. QEMU always runs",
    "with KVM (`-accel kvm -cpu host,-arch-capabilities`, which starts on Intel and AMD); where it",
    "cannot, its cells say why, never figures of its software emulator. `make bench` runs every",
    "bench and regenerates this file; `PYHV_BENCH_QUICK=1 make bench` is a quick run for",
    "development (fewer repetitions and sizes, marked on every table it produced).",
    "",
]


def cluster(d: dict[str, Any]) -> list[str]:
    host = d["run"]["cpu_model"]
    out = [
        f"The cluster balancer's decision (policy `cluster` plus the plan check; one warm-up, then "
        f"{d['repeat']} decisions; median (min-max), ms) for {num(d['hosts'], 0)} hosts of "
        f"{num(d['host_memory_gib'], 0)} GiB and {num(d['vms'], 0)} VMs of the synthetic fleet: "
        "*calm* (targets from the trace at hour 0) and *stressed* (a fifth of the hosts with "
        "every target raised by 15 %).",
        "",
        run_line("cluster", d),
        "",
    ]
    rows = []
    for fleet, c in d["cases"].items():
        rows.append(
            [host, fleet, num(d["vms"], 0), num(c["short_hosts"], 0), num(c["moves"], 0),
             spread(c["decision_ms"], 2)]
        )  # fmt: skip
    out += table(
        ["host (CPU model)", "fleet", "VMs", "short hosts", "moves planned", "decision ms"], rows
    )
    worst = max(c["decision_ms"]["median"] for c in d["cases"].values())
    sim = d["simulator"]
    out += [
        "",
        f"Goal: <= {num(d['goal_ms'], 0)} ms per decision: {met(worst <= d['goal_ms'])} "
        f"(slowest case {num(worst, 2)} ms). Placement: {spread(d['placement_ms_per_vm'], 3)} ms "
        f"per VM over {num(d['hosts'], 0)} hosts; the whole fleet placed in "
        f"{num(d['placement_fleet_s'], 2)} s.",
        "",
        f"Fleet simulator (host balancer per host per 60 s step, cluster policy every 300 s): "
        f"{num(d['vms'], 0)} VMs over {num(sim['hours'], 2)} simulated hours in "
        f"{num(sim['wall_s'], 2)} s: **{num(sim['vm_hours_per_s'], 0)} simulated VM-hours per "
        f"second**; {num(sim['migrations'], 0)} migrations, slowest cluster decision "
        f"{num(sim['policy_ms_max'], 2)} ms.",
        "",
    ]
    ha = d.get("ha_restart")
    if ha:
        s = ha["seconds"]
        out += [
            f"HA restart (an etcd and two VMMS hosts on loopback, lease TTL "
            f"{num(ha['lease_ttl_s'], 0)} s): every process of the host running a highly "
            "available 128 MiB guest killed at once; from the kill to the guest's first serial "
            f"byte on the other host, {num(ha['runs'], 0)} runs: **{spread(s, 2)} s**. Goal: "
            f"<= TTL + 3 s = {num(ha['goal_s'], 0)} s: {met(s['max'] <= ha['goal_s'])}.",
            "",
        ]
    return out


def smart(d: dict[str, Any]) -> list[str]:
    def ms(key: str) -> str:
        lo, hi = d[f"{key}_range"]
        return f"{num(d[key], 1)} ({num(lo, 1)}-{num(hi, 1)})"

    return [
        run_line("smartpaging", d),
        "",
        f"A 512 MiB Dynamic Memory VM in a worker process (no jail), {d['pairs']} pairs taking "
        f"turns: its top {d['paged_mib']} MiB backed by a Smart Paging file or not, from the "
        "worker's start to the shell prompt; then the end of Smart Paging (`end_smart_paging`: "
        "the file's data copied into a memfd while the VPs run, then the VPs paused while the "
        "pages they wrote since are copied again and the memfd is mapped at the same address), "
        "with the file empty and after `testlimit -m 470` wrote into it. Under a VMMS the "
        "worker's memory cgroup would have paged part of it out: the copy then reads it back "
        "from disk.",
        "",
        *table(
            ["", "figure (ms)"],
            [
                ["start to prompt, all RAM in memfds", ms("start_to_prompt_ms_memfd")],
                [
                    f"start to prompt, {d['paged_mib']} MiB on Smart Paging",
                    ms("start_to_prompt_ms_smart_paging"),
                ],
                ["end of Smart Paging, file empty: VPs paused", ms("move_paused_ms_empty")],
                [
                    f"end of Smart Paging, {num(d['move_copied_mib_testlimit'], 1)} MiB in the "
                    f"file: VPs paused ({num(d.get('move_copied_paused_kib_testlimit', 0), 1)} "
                    "KiB copied then)",
                    ms("move_paused_ms_testlimit"),
                ],
            ],
        ),
        "",
    ]


def render(results: Results) -> str:
    out = list(INTRO)
    quick = sorted(n for n, d in results.items() if d["run"].get("quick"))
    if quick:
        out += [
            f"> **Placeholder figures: {', '.join(quick)} come from quick runs "
            "(PYHV_BENCH_QUICK=1), not a full `make bench` on a quiet machine.**",
            "",
        ]
    sections: list[tuple[str, Callable[[], list[str]]]] = [
        ("Intercepts — `bench/intercepts.py`", lambda: _one(results, "intercepts", intercepts)),
        ("Boot — `bench/boot.py`", lambda: _one(results, "boot", boot)),
        (
            "Dynamic Memory — `bench/dynmem.py`, `bench/dynmem_host.py`",
            lambda: dynmem(results.get("dynmem"), results.get("dynmem_host")),
        ),
        ("Balancer — `bench/balancer.py`", lambda: _one(results, "balancer", balancer)),
        ("Live migration — `bench/migration.py`", lambda: _one(results, "migration", migration)),
        ("Cluster — `bench/cluster.py`", lambda: _one(results, "cluster", cluster)),
    ]
    sections += [
        ("Smart Paging — `bench/smartpaging.py`", lambda: _one(results, "smartpaging", smart)),
        ("Fuzzing — `bench/fuzz.py`", lambda: _one(results, "fuzz", fuzz)),
    ]
    for title, body in sections:
        out += [f"## {title}", "", *body()]
    while out and out[-1] == "":
        out.pop()
    return "\n".join(out) + "\n"


def _one(results: Results, name: str, section: Callable[[dict[str, Any]], list[str]]) -> list[str]:
    return section(results[name]) if name in results else missing(name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail if the doc is out of date")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--out", type=Path, default=DOC)
    args = ap.parse_args(argv)
    text = render(load(args.results))
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not what {args.results} gives: run python -m bench.report")
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
