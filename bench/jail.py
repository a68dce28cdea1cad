"""What the jail costs a VM's start: the same VM started by a WorkerProcess jailed (bwrap +
setpriv + memory cgroup, the worker's rlimits and seccomp; as the VMMS does when root) and not,
taking turns, from start() to the guest's first serial byte and to the shell prompt. Median and
min-max of 9 pairs (3 with PYHV_BENCH_QUICK=1). Needs root. Ends with one JSON line."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

PAIRS = common.pick(9, 3)


def one_start(jailed: bool, jails: object, image: str) -> tuple[float, float]:
    """Seconds from start() to the first serial byte and to the prompt."""
    from pyhv.vmms.jailing import WorkerJails
    from pyhv.worker.config import VmConfig
    from pyhv.worker.process import WorkerProcess

    first, prompt = threading.Event(), threading.Event()
    buf = bytearray()
    first_at = [0.0]

    def output(data: bytes) -> None:
        if not first.is_set():
            first_at[0] = time.perf_counter()
            first.set()
        buf.extend(data)
        if b"pyhv> " in buf:
            prompt.set()

    config = VmConfig.create(image=image, memory=128 << 20, name="benchjail")
    w = WorkerProcess(config, output=output)
    t0 = time.perf_counter()
    if jailed:
        assert isinstance(jails, WorkerJails)
        w.jail = jails.jail(config.name, image, network=False)
        w.cgroup = jails.cgroup(config.name, config.memory)
    w.start()
    if not first.wait(60) or not prompt.wait(60):
        raise SystemExit(f"no prompt (jailed={jailed}): {w.wait(5)}")
    t_prompt, t_first = time.perf_counter() - t0, first_at[0] - t0
    w.close()
    if w.cgroup is not None:
        w.cgroup.remove()
    return t_first, t_prompt


def main() -> int:
    if os.geteuid() != 0:
        print("bench/jail.py starts jailed workers: run it as root", file=sys.stderr)
        return 2
    from pyhv.guest_image import image_path
    from pyhv.vmms.jailing import JailPolicy, WorkerJails

    image = str(image_path())
    jails = WorkerJails(Path(tempfile.mkdtemp()), JailPolicy())
    one_start(True, jails, image)  # warm: the run loop's build, page cache
    runs: dict[str, list[tuple[float, float]]] = {"jailed": [], "not_jailed": []}
    for _ in range(PAIRS):
        runs["not_jailed"].append(one_start(False, jails, image))
        runs["jailed"].append(one_start(True, jails, image))
    out: dict[str, object] = {"pairs": PAIRS}
    for kind, rs in runs.items():
        for i, what in enumerate(("first_byte_ms", "prompt_ms")):
            ms = [r[i] * 1000 for r in rs]
            out[f"{kind}_{what}"] = round(statistics.median(ms), 1)
            out[f"{kind}_{what}_range"] = [round(min(ms), 1), round(max(ms), 1)]
    deltas = [(j[0] - n[0]) * 1000 for j, n in zip(runs["jailed"], runs["not_jailed"], strict=True)]
    out["jail_cost_first_byte_ms_median"] = round(statistics.median(deltas), 1)
    for k, v in out.items():
        print(f"{k:36} {v}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
