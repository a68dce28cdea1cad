"""Dynamic Memory end to end with the reference guest (its VMBus client and DM VSC) in a real VM:

- balloon, unballoon and hot-add of 256 MiB and 1 GiB: time from the request (set_memory_target)
  to the guest's last answer, and pages/s; the host-side release alone (the memory manager's
  fallocate(PUNCH_HOLE) calls inside the balloon);
- the VMBus ring with the real guest: a one-page balloon + unballoon ping-pong; the whole round
  trip (request posted -> the guest's answer handled), the host's share (doorbell eventfd seen ->
  answer handled and any reply posted), and packets/s through the channel;
- free-page hints: a 1 GiB guest touches 768 MiB and frees it; the time until the memory has left
  the host (goal <= 100 ms), the host's discard alone, and the guest's hint round trip; with RAM
  in 4 KiB memfd pages (the default) and in 2 MiB pages (`huge_pages`, pyhv.memory.hugeram);
- a burst: the guest commits 1 GiB at once under an in-process VMMS and its balancer; from the
  burst's status report to the memory added (goal <= 100 ms), and the guest's own wait;
- hot-remove of a hot-added region of 256 MiB (1 GiB too unless quick), touched by the guest and
  freed: time from the request to the guest's last answer handled (region unmapped, host memory
  behind it gone), and the host memory freed.

Balloon and unballoon are repeated (3 times per size; the guest touches its free memory again
before each balloon) and hot-add is measured once per size; figures are medians with min-max.
PYHV_BENCH_QUICK=1: 256 MiB only, once, and fewer ring rounds. Every figure is measured on PVM
(guest CPL0 code is emulated here). Writes bench/results/dynmem.json and ends stdout with the same
JSON object. Usage: python bench/dynmem.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
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


def boot(startup: str, maximum: str, huge_pages: bool = False) -> VirtualMachine:
    cfg = VmConfig.create(
        image=str(image_path()),
        dynamic_memory=True,
        startup=startup,
        minimum="128M",
        maximum=maximum,
        huge_pages=huge_pages,
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
    # the memory the guest frees before each balloon stays on the host (hints answered with
    # nothing discarded), so the balloon's own release is what is measured, as before hints
    dm.mm.discard = lambda _name, _ranges: 0  # type: ignore[method-assign,assignment]
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


def memfd_bytes(vm: VirtualMachine) -> int:
    assert vm.partition is not None
    return sum(os.fstat(r.memfd).st_blocks * 512 for r in vm.partition.regions)


def bench_hint(freed_mib: int, repeats: int, huge_pages: bool = False) -> dict[str, Any]:
    """A 1 GiB guest touches `freed_mib` MiB and frees it (testlimit, kill): from the kill typed
    to the memory off the host (memfd blocks), the host's discard alone (wall clock, and the CPU
    time of its thread: the kernel's work, which a loaded host stretches in wall-clock time),
    the guest's round trip (its clock: 10 ms ticks). `huge_pages`: RAM in 2 MiB pages."""
    vm = boot("1024M", "1024M", huge_pages)
    dm = vm.dynmem
    assert dm is not None
    real_discard = dm.mm.discard
    discards: list[tuple[float, float, int, float]] = []

    def timed_discard(name: str, ranges: Any) -> int:
        t0, c0 = time.perf_counter(), time.thread_time()
        n = real_discard(name, ranges)
        discards.append((t0, time.perf_counter(), n, time.thread_time() - c0))
        return n

    dm.mm.discard = timed_discard  # type: ignore[method-assign]
    s: dict[str, list[float]] = {}
    try:
        wait_until(lambda: "hints-sent: 0" not in shell(vm, "dm"))
        for _ in range(repeats):
            shell(vm, f"testlimit -m {freed_mib} -c 1")
            wait_until(lambda: memfd_bytes(vm) >= freed_mib * MiB)
            wait_until(
                lambda: f"touched {freed_mib * PAGES_PER_MIB} pages" in shell(vm, "tasks"), 300
            )
            before = memfd_bytes(vm)
            discards.clear()
            t0 = time.perf_counter()
            vm.send(b"kill" + ENTER)
            target = before - (freed_mib - 8) * MiB
            while memfd_bytes(vm) > target:
                if time.perf_counter() - t0 > 60:
                    raise TimeoutError("the freed memory did not leave the host")
                time.sleep(0.002)
            t_gone = time.perf_counter()
            vm.serial.read_until(PROMPT, 60)
            dm_out = dict(re.findall(r"^([a-z-]+): (.*?)\r?$", shell(vm, "dm"), re.M))
            big = max(discards, key=lambda d: d[2])
            s.setdefault("kill_to_gone_ms", []).append((t_gone - t0) * 1e3)
            s.setdefault("hint_to_gone_ms", []).append((t_gone - big[0]) * 1e3)
            s.setdefault("host_discard_ms", []).append((big[1] - big[0]) * 1e3)
            s.setdefault("host_discard_cpu_ms", []).append(big[3] * 1e3)
            s.setdefault("guest_round_trip_ms", []).append(float(dm_out["hint-last-ms"]))
            s.setdefault("host_freed_MiB", []).append((before - memfd_bytes(vm)) / MiB)
    finally:
        vm.close()
    out: dict[str, Any] = {
        "freed_MiB": freed_mib,
        "guest_MiB": 1024,
        "goal_ms": 100,
        "ram": "2 MiB pages (huge_pages)" if huge_pages else "4 KiB pages (memfd)",
    }
    out.update({k: common.spread(v, 1) for k, v in s.items()})
    return out


def bench_burst(burst_mib: int) -> dict[str, Any]:
    """The guest commits `burst_mib` MiB at once under an in-process VMMS
    (pyhv.experiments.burst): from the burst's status report (as the VMMS receives it) to the
    balancer's decision and to the memory added; the guest's own wait."""
    import tempfile

    from pyhv.experiments.burst import run_burst

    with tempfile.TemporaryDirectory() as tmp:
        r = run_burst(Path(tmp), burst_mib)
    decision = r.report_to_decision_s
    return {
        "burst_MiB": burst_mib,
        "goal_ms": 100,
        "typed_to_report_ms": round(r.typed_to_report_s * 1e3, 1),
        "report_to_decision_ms": None if decision is None else round(decision * 1e3, 1),
        "report_to_added_ms": round(r.report_to_added_s * 1e3, 1),
        "guest_longest_wait_ms": r.guest_longest_wait_ms,
        "guest_all_allocated_ms": r.guest_all_allocated_ms,
    }


def bench_hot_remove(mib: int, repeats: int) -> dict[str, Any]:
    """Hot-add `mib` MiB, let the guest touch and free it (no free-page hints: the host keeps
    backing it), then hot-remove it; `repeats` times."""
    vm = boot("256M", f"{256 + mib}M")
    dm = vm.dynmem
    assert dm is not None
    s: dict[str, list[float]] = {}
    try:
        shell(vm, "dm nohints")
        for _ in range(repeats):
            timed_target(vm, (256 + mib) * MiB)
            free = mem(vm)["free"]
            shell(vm, f"testlimit -m {free - 32} -c 1")
            wait_until(lambda: vm.host_resident_bytes() >= (256 + mib - 64) * MiB)
            shell(vm, "kill")
            host0 = vm.host_resident_bytes()
            t0 = time.perf_counter()
            vm.hot_remove_memory()
            assert vm.wait_memory_idle(300)
            dt = time.perf_counter() - t0
            st = vm.memory_status()
            if st["hot_added_pages"] or st["last_error"]:
                raise RuntimeError(f"hot-remove left {st['hot_added_pages']} pages: {st}")
            s.setdefault("hot_remove_ms", []).append(dt * 1e3)
            s.setdefault("hot_remove_pages_per_s", []).append(mib * PAGES_PER_MIB / dt)
            s.setdefault("host_freed_MiB", []).append((host0 - vm.host_resident_bytes()) / MiB)
    finally:
        vm.close()
    return {k: common.spread(v, 2 if k.endswith(("_ms", "_MiB")) else 0) for k, v in s.items()}


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
    # the two backings one after the other, close in time (the host is shared)
    for key, huge in (("hint", False), ("hint_huge_pages", True)):
        hint = bench_hint(768, repeats, huge)
        out[key] = hint
        print(
            f"free-page hints, {hint['freed_MiB']} MiB freed in a 1 GiB guest, RAM in "
            f"{hint['ram']}: off the host {hint['hint_to_gone_ms']['median']:.1f} ms after the "
            f"hint ({hint['kill_to_gone_ms']['median']:.0f} ms after the kill was typed; host "
            f"discard {hint['host_discard_ms']['median']:.1f} ms, "
            f"{hint['host_discard_cpu_ms']['median']:.1f} ms CPU; guest round trip "
            f"{hint['guest_round_trip_ms']['median']:.0f} ms)"
        )
    burst = bench_burst(1024)
    out["burst"] = burst
    print(
        f"burst of {burst['burst_MiB']} MiB committed: report -> memory added "
        f"{burst['report_to_added_ms']:.0f} ms (decision {burst['report_to_decision_ms']} ms); "
        f"guest: longest wait {burst['guest_longest_wait_ms']} ms, all allocated after "
        f"{burst['guest_all_allocated_ms']} ms"
    )
    out["hot_remove"] = {}
    for mib in args.sizes:
        hr = bench_hot_remove(mib, repeats)
        out["hot_remove"][f"{mib}MiB"] = hr
        print(
            f"hot-remove of a {mib} MiB region the guest touched and freed: "
            f"{hr['hot_remove_ms']['median']:.1f} ms "
            f"({hr['hot_remove_pages_per_s']['median']:,.0f} pages/s), host memory freed "
            f"{hr['host_freed_MiB']['median']:.0f} MiB"
        )
    common.finish("dynmem", out, run)


if __name__ == "__main__":
    main()
