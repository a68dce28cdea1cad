"""The fuzz campaign, timed: every decoder a guest or a peer reaches (tests/support/fuzz: VMBus
ring and controller, Dynamic Memory messages and VSP, migration frames, handshake and state,
VMMS request bodies and whole HTTP requests on a live VMMS, worker messages and control socket,
device ports, image loaders) fed mutated valid encodings for N seconds each. Prints inputs per
second and crashes per decoder, writes bench/results/fuzz.json and ends stdout with the same
JSON object ({"decoders": K, "inputs": N, "crashes": 0, ...}). Exit status 1 if any crashed.

A crash is an exception the decoder does not declare, a hang (one input over 2 s) or unbounded
memory (the process's peak resident memory grown by 32 MiB in one input; --trace-memory counts
each input's allocations with tracemalloc instead: exact, and several times slower). Each
crashing input is printed in hex (and written to --crashes DIR).

Usage: python bench/fuzz.py [--seconds S] [--only NAME,...] [--seed N] [--trace-memory]
                            [--crashes DIR]
Default S: 10 (1 with PYHV_BENCH_QUICK=1; PYHV_FUZZ_SECONDS overrides both). A longer campaign:
`python bench/fuzz.py --seconds 600 --seed 7 --crashes /tmp/crashes` (docs/security.md).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from tests.support.fuzz import Crash, Mutator, Target, all_targets, run_one  # noqa: E402
from tests.support.fuzz import vmms_http as http  # noqa: E402


@contextlib.contextmanager
def live_vmms() -> Iterator[Target]:
    """The HTTP target against a `pyhv vmms serve` of its own (no VMs run)."""
    from tests.vmms.vmms_process import vmms_host

    with (
        tempfile.TemporaryDirectory(prefix="pyhv-fuzz-") as tmp,
        vmms_host(Path(tmp), budget="1G") as host,
    ):
        sock = Path(host.state) / "vmms.sock"
        yield http.target(sock, lambda: host.proc.poll() is None)
        http.still_answers(sock)


def campaign(t: Target, seconds: float, seed: int) -> dict[str, Any]:
    """Run `t` for `seconds`: its seeds, then mutated inputs. Crashes are kept by kind and
    place (the same bug found again is counted, not listed again)."""
    limit = None if t.needs else 32 << 20  # the live server is another process
    time_limit = http.ANSWER_TIME + 5 if t.needs else 2.0
    crashes: dict[str, Crash] = {}
    found = 0

    def one(data: bytes) -> None:
        nonlocal found
        try:
            run_one(t, data, time_limit=time_limit, memory_limit=limit)
        except Crash as e:
            found += 1
            cause = e.__cause__
            where = ""
            if cause is not None and cause.__traceback__ is not None:
                tb = cause.__traceback__
                while tb.tb_next is not None:
                    tb = tb.tb_next
                where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}"
            crashes.setdefault(f"{e.kind} {e.detail.split(':')[0]} {where}", e)

    for s in t.corpus:
        one(s)
    fuzz = Mutator(t, seed)
    n = 0
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end:
        one(fuzz())
        n += 1
    took = time.monotonic() - start
    return {
        "what": t.what,
        "inputs": n,
        "seeds": len(t.corpus),
        "inputs_per_s": round(n / took, 1),
        "crashes": found,
        "distinct_crashes": [
            {"kind": e.kind, "detail": e.detail[:300], "input_hex": e.data[:512].hex()}
            for e in crashes.values()
        ],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    default = float(os.environ.get("PYHV_FUZZ_SECONDS") or common.pick(10, 1))
    ap.add_argument("--seconds", type=float, default=default, help="per decoder")
    ap.add_argument("--only", default="", help="comma-separated decoder names (or prefixes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--trace-memory", action="store_true", help="exact per-input memory (tracemalloc)"
    )
    ap.add_argument("--crashes", type=Path, help="write each crashing input to this directory")
    args = ap.parse_args()
    run = common.run_info()
    logging.disable(logging.CRITICAL)  # refusals are logged by design: millions of lines
    wanted = [w for w in args.only.split(",") if w]
    targets = [t for t in all_targets() if not wanted or t.name.startswith(tuple(wanted))]
    with_http = not wanted or any("vmms.http".startswith(w) for w in wanted)
    memory = "tracemalloc" if args.trace_memory else "peak RSS"
    if args.trace_memory:
        tracemalloc.start()
    per: dict[str, dict[str, Any]] = {}
    for t in targets:
        per[t.name] = campaign(t, args.seconds, args.seed)
        _show(t.name, per[t.name])
    if with_http:
        with live_vmms() as t:
            per[t.name] = campaign(t, args.seconds, args.seed)
            _show(t.name, per[t.name])
    if args.trace_memory:
        tracemalloc.stop()
    if args.crashes is not None:
        args.crashes.mkdir(parents=True, exist_ok=True)
        for name, r in per.items():
            for i, c in enumerate(r["distinct_crashes"]):
                (args.crashes / f"{name}-{i}.bin").write_bytes(bytes.fromhex(c["input_hex"]))
    result = {
        "decoders": len(per),
        "inputs": sum(r["inputs"] for r in per.values()),
        "crashes": sum(r["crashes"] for r in per.values()),
        "seconds_per_decoder": args.seconds,
        "seed": args.seed,
        "memory_checked": memory,
        "per_decoder": per,
    }
    common.finish("fuzz", result, run)
    return 1 if result["crashes"] else 0


def _show(name: str, r: dict[str, Any]) -> None:
    print(
        f"{name:26} {r['inputs']:>9} inputs {r['inputs_per_s']:>9.0f}/s  crashes {r['crashes']}",
        flush=True,
    )
    for c in r["distinct_crashes"]:
        print(f"    {c['kind']}: {c['detail']}\n    input: {c['input_hex'][:256]}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
