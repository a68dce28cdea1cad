"""Decision time of the Dynamic Memory balancer for 10, 1 000 and 10 000 simulated VMs.

Two fleets: "steady" (every VM at its target except 1 % whose demand just moved: the usual
second) and "churn" (random demand around the assignment, balloons, lazy timers running: most VMs
get an operation). Two hosts: roomy, and short of memory (weights and reclaim at work). Two entry
points: `decide` over per-VM dataclasses (includes turning them into columns) and
`decide_table` over a VmTable (a simulation that keeps its VMs as columns).
Prints one line per case and, last, a JSON line. Goal: 10 000 VMs per tick in <= 10 ms.
Usage: python bench/balancer.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

from pyhv.dynmem.balancer import (
    BalancerConfig,
    HostMemory,
    MemorySettings,
    StatusReport,
    VmMemoryState,
    VmTable,
    decide,
    decide_table,
    pages_from_mib,
)

MIB = pages_from_mib(1)


def fleet(n: int, churn: bool, seed: int = 1) -> list[VmMemoryState]:
    rnd = random.Random(seed)
    vms = []
    for i in range(n):
        minimum = rnd.choice([256, 512, 1024]) * MIB
        maximum = minimum * rnd.choice([4, 8, 16])
        buffer = rnd.choice([10, 20, 50])
        settings = MemorySettings(minimum, minimum, maximum, buffer, rnd.randint(0, 100))
        visible = rnd.randint(minimum, maximum)
        ballooned = rnd.choice([0, 0, rnd.randint(0, visible - minimum)])
        assigned = visible - ballooned
        if churn or i % 100 == 0:
            committed = int(assigned * rnd.uniform(0.5, 1.3))
            timer = rnd.choice([0.0, 0.0, 30.0, 200.0])
        else:
            committed = assigned * 100 // (100 + buffer)  # at target
            timer = 0.0
        vm = VmMemoryState(f"vm{i}", settings, visible, assigned, ballooned, None, timer)
        vms.append(replace(vm, report=StatusReport(committed, assigned // 4)))
    return vms


def median_ms(run: Callable[[], object], repeat: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1e3, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    config = BalancerConfig()
    result: dict[str, dict[str, float]] = {}
    for n in (10, 1_000, 10_000):
        case: dict[str, float] = {}
        for kind in ("steady", "churn"):
            vms = fleet(n, churn=kind == "churn")
            table = VmTable.from_states(vms)
            total = sum(v.settings.maximum_pages for v in vms)
            hosts = {
                "roomy": HostMemory(free_pages=total, reserve_pages=1024 * MIB),
                "short": HostMemory(free_pages=total // 1000, reserve_pages=0),
            }
            for hname, host in hosts.items():
                case[f"{kind}_{hname}_decide_ms"] = median_ms(
                    lambda h=host, v=vms: decide(h, v, config), args.repeat
                )
                case[f"{kind}_{hname}_table_ms"] = median_ms(
                    lambda h=host, t=table: decide_table(h, t, config), args.repeat
                )
            ops = len(decide(hosts["roomy"], vms, config).operations)
            case[f"{kind}_roomy_operations"] = ops
        result[str(n)] = case
        print(f"{n:>6} VMs: " + ", ".join(f"{k}={v}" for k, v in case.items()))
    print(
        json.dumps(
            {"bench": "balancer", "goal_ms_10000": 10.0, "repeat": args.repeat, "vms": result}
        )
    )


if __name__ == "__main__":
    main()
