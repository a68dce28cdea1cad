"""What every bench shares: the run block (which machine, kernel, KVM module, Python and QEMU
measured), quick mode, medians with min-max, the QEMU command line, and writing the result.

Each bench writes its result to bench/results/<bench>.json (the input of bench/report.py, which
generates docs/benchmarks.md) and still ends stdout with the same object as one JSON line.

PYHV_BENCH_QUICK=1: fewer repetitions and sizes, for developing a bench (the run block says so and
the generated doc marks its tables as a quick run). PYHV_BENCH_RESULTS=DIR writes elsewhere.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
QUICK_ENV = "PYHV_BENCH_QUICK"
LABEL = "measured on PVM"

#: QEMU always with KVM, never the software emulator. `-cpu host` aborts QEMU 7.2 on AMD hosts
#: ("failed to set MSR 0x10a"); without arch-capabilities it starts on Intel and AMD alike.
QEMU_KVM = ["-accel", "kvm", "-cpu", "host,-arch-capabilities"]


def quick() -> bool:
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def pick(full: Any, quick_value: Any) -> Any:
    """`full` in a full run, `quick_value` under PYHV_BENCH_QUICK=1."""
    return quick_value if quick() else full


def spread(samples: Iterable[float], digits: int = 3) -> dict[str, Any]:
    """Median and min-max of repeated measurements (never best-of: that hides the noise)."""
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("no samples")

    def r(x: float) -> float | int:
        return round(x) if digits == 0 else round(x, digits)

    return {"median": r(statistics.median(xs)), "min": r(min(xs)), "max": r(max(xs)), "n": len(xs)}


def qemu_binary() -> str | None:
    return shutil.which("qemu-system-x86_64")


def _qemu_version() -> str | None:
    qemu = qemu_binary()
    if qemu is None:
        return None
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    first = out.splitlines()[0] if out else ""
    return first.removeprefix("QEMU emulator version ").strip() or None


def kvm_modules() -> list[str]:
    """The KVM vendor modules loaded (kvm_intel, kvm_amd, kvm_pvm...): /sys/module/kvm_*."""
    return sorted(p.name for p in Path("/sys/module").glob("kvm_*"))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str | None:
    """The commit measured, with "+changes" when the work tree differs from it."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return r.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        # results and the generated doc change with every run: not a change of what is measured
        changed = git("status", "--porcelain", "--", ".", ":!bench/results", ":!docs/benchmarks.md")
    except OSError:
        return None
    return (head + ("+changes" if changed else "")) or None


def run_info() -> dict[str, Any]:
    """The `run` block: when and on what the figures were measured."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "kvm_module": ",".join(kvm_modules()) or "none",
        "python": platform.python_version(),
        "qemu": _qemu_version() or "not installed",
        "commit": _commit(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "quick": quick(),
        "started": time.monotonic(),  # replaced by elapsed_s when the bench finishes
    }


def results_dir() -> Path:
    return Path(os.environ.get("PYHV_BENCH_RESULTS") or RESULTS)


def finish(bench: str, result: dict[str, Any], run: dict[str, Any]) -> Path:
    """Write bench/results/<bench>.json (with `run`, taken at the start) and print it as the
    last stdout line."""
    run = dict(run)
    run["elapsed_s"] = round(time.monotonic() - run.pop("started"))
    doc = {"bench": bench, "label": LABEL, "run": run, **result}
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}.json"
    path.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path}")
    print(json.dumps(doc))
    return path
