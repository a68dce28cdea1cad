"""Dynamic Memory end to end with the reference guest (its VMBus client and DM VSC) in a real VM:

- balloon, unballoon and hot-add of 256 MiB and 1 GiB: time from the request (set_memory_target)
  to the guest's last answer, and pages/s; the host-side release alone (the memory manager's
  fallocate(PUNCH_HOLE) calls inside the balloon);
- the VMBus ring with the real guest: a one-page balloon + unballoon ping-pong; the whole round
  trip (request posted -> the guest's answer handled), the host's share (doorbell eventfd seen ->
  answer handled and any reply posted), and packets/s through the channel.

Every figure is measured on PVM (guest CPL0 code is emulated here). The last stdout line is one
JSON object. Usage: python bench/dynmem.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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


def bench_size(mib: int) -> dict[str, float]:
    """Balloon, unballoon and hot-add `mib` MiB in a guest that has touched its free memory."""
    startup = 2 * mib + 256
    vm = boot(f"{startup}M", f"{startup + mib}M")
    dm = vm.dynmem
    assert dm is not None
    out: dict[str, float] = {}
    try:
        free = mem(vm)["free"]
        shell(vm, f"testlimit -m {free - 32} -c 1")  # populate host memory behind the guest
        wait_until(lambda: vm.host_resident_bytes() >= (startup - 64) * MiB)
        shell(vm, "kill")
        release_s: list[float] = []
        real_release = dm.mm.release

        def timed_release(name: str, ranges: Any) -> int:
            t0 = time.perf_counter()
            n = real_release(name, ranges)
            release_s.append(time.perf_counter() - t0)
            return n

        dm.mm.release = timed_release  # type: ignore[method-assign]
        host0 = vm.host_resident_bytes()
        dt = timed_target(vm, (startup - mib) * MiB)
        freed = host0 - vm.host_resident_bytes()
        pages = mib * PAGES_PER_MIB
        out[f"balloon_{mib}MiB_s"] = dt
        out[f"balloon_{mib}MiB_pages_per_s"] = pages / dt
        out[f"balloon_{mib}MiB_host_freed_MiB"] = freed / MiB
        out[f"release_{mib}MiB_host_only_s"] = sum(release_s)
        out[f"release_{mib}MiB_GiB_per_s"] = mib / 1024 / sum(release_s)
        dt = timed_target(vm, startup * MiB)
        out[f"unballoon_{mib}MiB_s"] = dt
        out[f"unballoon_{mib}MiB_pages_per_s"] = pages / dt
        dt = timed_target(vm, (startup + mib) * MiB)
        assert mem(vm)["hot-added"] == mib
        out[f"hot_add_{mib}MiB_s"] = dt
        out[f"hot_add_{mib}MiB_pages_per_s"] = pages / dt
    finally:
        vm.close()
    return out


def bench_ring(rounds: int) -> dict[str, float]:
    """A one-page balloon + unballoon ping-pong with the real guest."""
    vm = boot("512M", "512M")
    dm = vm.dynmem
    assert dm is not None
    vsp = dm.vsp
    done = threading.Event()
    vsp._on_balloon_done = lambda _n: done.set()
    vsp._on_unballoon_done = lambda _r: done.set()
    whole: list[float] = []
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
        "ring_round_trip_us_median": statistics.median(whole) * 1e6,
        "ring_round_trip_us_p90": sorted(whole)[int(len(whole) * 0.9)] * 1e6,
        "ring_host_share_us_median": statistics.median(host),
        "ring_packets_per_s": packets / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200, help="ping-pong rounds for the ring")
    args = ap.parse_args()
    out: dict[str, Any] = {"label": "measured on PVM"}
    print("Dynamic Memory end to end with the reference guest (measured on PVM)")
    for mib in (256, 1024):
        r = bench_size(mib)
        out.update(r)
        print(
            f"{mib} MiB: balloon {r[f'balloon_{mib}MiB_s'] * 1e3:.0f} ms "
            f"({r[f'balloon_{mib}MiB_pages_per_s']:,.0f} pages/s, host freed "
            f"{r[f'balloon_{mib}MiB_host_freed_MiB']:.0f} MiB; host release alone "
            f"{r[f'release_{mib}MiB_host_only_s'] * 1e3:.1f} ms), unballoon "
            f"{r[f'unballoon_{mib}MiB_s'] * 1e3:.0f} ms, hot-add "
            f"{r[f'hot_add_{mib}MiB_s'] * 1e3:.0f} ms"
        )
    ring = bench_ring(args.rounds)
    out.update(ring)
    print(
        f"ring with the guest: round trip {ring['ring_round_trip_us_median']:.0f} us median "
        f"(p90 {ring['ring_round_trip_us_p90']:.0f}), host share "
        f"{ring['ring_host_share_us_median']:.0f} us, {ring['ring_packets_per_s']:,.0f} packets/s"
    )
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
