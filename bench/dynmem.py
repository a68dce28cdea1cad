"""Dynamic Memory end to end with the reference guest (its VMBus client and DM VSC) in a real VM:

- balloon, unballoon and hot-add of 256 MiB and 1 GiB: time from the request (set_memory_target)
  to the guest's last answer, and pages/s; the host-side release alone (the memory manager's
  fallocate(PUNCH_HOLE) calls inside the balloon);
- the VMBus ring with the real guest: a one-page balloon + unballoon ping-pong; the whole round
  trip (request posted -> the guest's answer handled), the host's share (doorbell eventfd seen ->
  answer handled and any reply posted), and packets/s through the channel.

Balloon and unballoon are repeated (3 times per size; the guest touches its free memory again
before each balloon) and hot-add is measured once per size; figures are medians with min-max.
PYHV_BENCH_QUICK=1: 256 MiB only, once, and fewer ring rounds. Every figure is measured on PVM
(guest CPL0 code is emulated here). Writes bench/results/dynmem.json and ends stdout with the same
JSON object. Usage: python bench/dynmem.py [--rounds N]
"""

from __future__ import annotations

import argparse
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from pyhv.guest_image import image_path  # noqa: E402
from pyhv.worker import VirtualMachine, VmConfig  # noqa: E402
from pyhv.worker.script import ENTER, PROMPT  # noqa: E402

MiB = 1 << 20
PAGES_PER_MIB = 256


def shell(vm: VirtualMachine, command: str) -> str:
    vm.send(command.encode() + ENTER)
    return vm.serial.read_until(PROMPT, 120).decode()


def mem(vm: VirtualMachine) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^([a-z-]+): (\d+) MiB\r?$", shell(vm, "mem"), re.M)}


def wait_until(pred: Any, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise TimeoutError("the guest did not get there")
        time.sleep(0.02)


def boot(startup: str, maximum: str) -> VirtualMachine:
    cfg = VmConfig.create(
        image=str(image_path()),
        dynamic_memory=True,
        startup=startup,
        minimum="128M",
        maximum=maximum,
    )
    vm = VirtualMachine(cfg)
    vm.start()
    vm.serial.read_until(PROMPT, 60)
    assert vm.dynmem is not None
    wait_until(lambda: vm.dynmem.negotiated)  # type: ignore[union-attr]
    return vm


def timed_target(vm: VirtualMachine, size: int) -> float:
    t0 = time.perf_counter()
    vm.set_memory_target(size)
    assert vm.wait_memory_idle(300)
    dt = time.perf_counter() - t0
    err = vm.memory_status()["last_error"]
    if err:
        raise RuntimeError(f"target {size >> 20} MiB: {err}")
    return dt


def bench_size(mib: int, repeats: int) -> dict[str, Any]:
    """Balloon and unballoon `mib` MiB `repeats` times in a guest that has touched its free
    memory before each balloon, then hot-add `mib` MiB once."""
    startup = 2 * mib + 256
    vm = boot(f"{startup}M", f"{startup + mib}M")
    dm = vm.dynmem
    assert dm is not None
    pages = mib * PAGES_PER_MIB
    s: dict[str, list[float]] = {}
    release_s: list[float] = []
    real_release = dm.mm.release

    def timed_release(name: str, ranges: Any) -> int:
        t0 = time.perf_counter()
        n = real_release(name, ranges)
        release_s.append(time.perf_counter() - t0)
        return n

    dm.mm.release = timed_release  # type: ignore[method-assign]
    try:
        for _ in range(repeats):
            free = mem(vm)["free"]
            shell(vm, f"testlimit -m {free - 32} -c 1")  # populate host memory behind the guest
            wait_until(lambda: vm.host_resident_bytes() >= (startup - 64) * MiB)
            shell(vm, "kill")
            release_s.clear()
            host0 = vm.host_resident_bytes()
            dt = timed_target(vm, (startup - mib) * MiB)
            s.setdefault("balloon_ms", []).append(dt * 1e3)
            s.setdefault("balloon_pages_per_s", []).append(pages / dt)
            s.setdefault("balloon_host_freed_MiB", []).append(
                (host0 - vm.host_resident_bytes()) / MiB
            )
            s.setdefault("release_host_only_ms", []).append(sum(release_s) * 1e3)
            s.setdefault("release_GiB_per_s", []).append(mib / 1024 / sum(release_s))
            dt = timed_target(vm, startup * MiB)
            s.setdefault("unballoon_ms", []).append(dt * 1e3)
            s.setdefault("unballoon_pages_per_s", []).append(pages / dt)
        dt = timed_target(vm, (startup + mib) * MiB)
        assert mem(vm)["hot-added"] == mib
        s["hot_add_ms"] = [dt * 1e3]
        s["hot_add_pages_per_s"] = [pages / dt]
    finally:
        vm.close()
    return {
        k: common.spread(v, 2 if k.endswith(("_ms", "_MiB", "_s")) else 0) for k, v in s.items()
    }


def bench_ring(rounds: int) -> dict[str, Any]:
    """A one-page balloon + unballoon ping-pong with the real guest."""
    vm = boot("512M", "512M")
    dm = vm.dynmem
    assert dm is not None
    vsp = dm.vsp
    done = threading.Event()
    vsp._on_balloon_done = lambda _n: done.set()
    vsp._on_unballoon_done = lambda _r: done.set()
    whole: list[float] = []  # seconds per round trip
    try:
        dm.measure = True
        dm.doorbell_ns.clear()
        packets0 = vsp.counters["packets"] + vsp.counters["sent"]
        t_start = time.perf_counter()
        for _ in range(rounds):
            for step in ("balloon", "unballoon"):
                done.clear()
                t0 = time.perf_counter()
                with vsp.lock:
                    if step == "balloon":
                        vsp.balloon(1)
                    else:
                        ranges = list(vsp.ballooned)
                        dm.mm.reclaim(dm.name, ranges)
                        vsp.unballoon(ranges)
                if not done.wait(30):
                    raise TimeoutError(f"no answer to {step}")
                whole.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - t_start
        packets = vsp.counters["packets"] + vsp.counters["sent"] - packets0
        host = [ns / 1000 for ns in dm.doorbell_ns]
    finally:
        vm.close()
    return {
        "rounds": rounds,
        "round_trip_us": common.spread([x * 1e6 for x in whole], 1),
        "round_trip_us_p90": round(sorted(whole)[int(len(whole) * 0.9)] * 1e6, 1),
        "host_share_us": common.spread(host, 1),
        "packets_per_s": round(packets / elapsed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--rounds", type=int, default=common.pick(200, 50), help="ping-pong rounds for the ring"
    )
    ap.add_argument("--sizes", type=int, nargs="+", default=common.pick([256, 1024], [256]))
    ap.add_argument("--repeats", type=int, default=common.pick(3, 1))
    args = ap.parse_args()
    run = common.run_info()
    repeats = args.repeats
    out: dict[str, Any] = {"repeats": repeats, "sizes": {}}
    print("Dynamic Memory end to end with the reference guest (measured on PVM)")
    for mib in args.sizes:
        r = bench_size(mib, repeats)
        out["sizes"][f"{mib}MiB"] = r
        print(
            f"{mib} MiB: balloon {r['balloon_ms']['median']:.0f} ms "
            f"({r['balloon_pages_per_s']['median']:,.0f} pages/s; host release alone "
            f"{r['release_host_only_ms']['median']:.1f} ms), unballoon "
            f"{r['unballoon_ms']['median']:.0f} ms, hot-add {r['hot_add_ms']['median']:.0f} ms"
        )
    ring = bench_ring(args.rounds)
    out["ring"] = ring
    print(
        f"ring with the guest: round trip {ring['round_trip_us']['median']:.0f} us median "
        f"(p90 {ring['round_trip_us_p90']:.0f}), host share "
        f"{ring['host_share_us']['median']:.0f} us, {ring['packets_per_s']:,} packets/s"
    )
    common.finish("dynmem", out, run)


if __name__ == "__main__":
    main()
