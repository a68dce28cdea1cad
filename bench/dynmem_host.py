"""Host side of Dynamic Memory without KVM: how fast the memory manager releases ballooned
memory (fallocate(PUNCH_HOLE) on the memfd behind guest RAM), and how fast the VMBus ring and
the DM VSP handle packets with a Python guest peer in the same process.

Goals: release >= 10 GiB/s, judged on the best pattern (scattered 2 MiB ranges) and the worst
(scattered 4 KiB pages, one fallocate each); the host's part of a ring round trip (read a
request, write a reply) <= 50 us. Every release figure is the median with min-max of 5 runs
(2 with PYHV_BENCH_QUICK=1). Prints one line per case, writes bench/results/dynmem_host.json and
ends stdout with the same JSON object.
Usage: python bench/dynmem_host.py [--gib N]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common  # noqa: E402
from pyhv.dynmem import protocol as p  # noqa: E402
from pyhv.dynmem.vsp import DynamicMemoryVsp  # noqa: E402
from pyhv.memory.manager import PAGE_SIZE, MemfdRegion, MemoryManager, punch_hole  # noqa: E402
from pyhv.memory.ranges import PageRange, RangeSet  # noqa: E402
from pyhv.vmbus.ring import RingReader, RingWriter  # noqa: E402
from tests.support.guest_ring import GuestRing  # noqa: E402

MiB = 1 << 20


def populate(fd: int, size: int) -> None:
    chunk = b"\xa5" * (8 * MiB)
    for off in range(0, size, len(chunk)):
        os.pwrite(fd, chunk, off)


def bench_release(gib: int, range_pages: int, stride: int = 1) -> float:
    """GiB/s releasing `gib` GiB of populated guest RAM in ranges of `range_pages` pages
    (every `stride`-th one), 510 ranges per call (one full balloon response)."""
    size = gib << 30
    region = MemfdRegion(0, size)
    try:
        populate(region.memfd, size)
        assert os.fstat(region.memfd).st_blocks * 512 >= size
        mm = MemoryManager(2 * size)
        mm.add_partition("vm", [region])
        step = range_pages * stride
        ranges = [PageRange(s, range_pages) for s in range(0, size // PAGE_SIZE, step)]
        t0 = time.perf_counter()
        for i in range(0, len(ranges), 510):
            mm.release("vm", ranges[i : i + 510])
        dt = time.perf_counter() - t0
        left = os.fstat(region.memfd).st_blocks * 512
        assert left == size - size // stride, "the kernel must free exactly what was released"
        return gib / stride / dt
    finally:
        region.close()


def bench_raw_punch(gib: int, range_pages: int, stride: int) -> float:
    """The kernel's floor: the same holes punched directly, without the memory manager."""
    size = gib << 30
    region = MemfdRegion(0, size)
    try:
        populate(region.memfd, size)
        step, length = range_pages * stride * PAGE_SIZE, range_pages * PAGE_SIZE
        t0 = time.perf_counter()
        for off in range(0, size, step):
            punch_hole(region.memfd, off, length)
        return gib / stride / (time.perf_counter() - t0)
    finally:
        region.close()


def bench_ring(n: int) -> dict[str, float]:
    m = mmap.mmap(-1, 8 * PAGE_SIZE)
    mv = memoryview(m)
    up = GuestRing(mv[: 4 * PAGE_SIZE], init=True)
    down = GuestRing(mv[4 * PAGE_SIZE :], init=True)
    reader, writer = RingReader(mv[: 4 * PAGE_SIZE]), RingWriter(mv[4 * PAGE_SIZE :])
    payload = bytes(48)  # a status report
    # host writes, guest drains when full
    t_write = 0.0
    sent = 0
    while sent < n:
        t0 = time.perf_counter()
        while sent < n and writer.try_write(payload, sent):
            sent += 1
        t_write += time.perf_counter() - t0
        while down.read() is not None:
            pass
    # guest fills, host reads in batches
    t_read = 0.0
    got = 0
    while got < n:
        try:
            while True:
                up.write(payload)
        except BlockingIOError:
            pass
        t0 = time.perf_counter()
        got += len(reader.read_packets())
        t_read += time.perf_counter() - t0
    # round trip: the host's part = read one request + write one reply
    rt = []
    for i in range(min(n, 20000)):
        up.write(payload, i)
        t0 = time.perf_counter()
        pkt = reader.read_packet()
        assert pkt is not None
        writer.try_write(pkt.payload, pkt.trans_id)
        rt.append(time.perf_counter() - t0)
        down.read()
    return {
        "host_write_pkts_per_s": n / t_write,
        "host_read_pkts_per_s": n / t_read,
        "host_round_trip_us_median": statistics.median(rt) * 1e6,
    }


def bench_balloon_response(n: int) -> float:
    """Microseconds for the VSP to decode and check a full balloon response (510 x 2 MiB)."""
    vsp = DynamicMemoryVsp(RangeSet([(0, 1 << 30)]), lambda raw: True)
    vsp.on_message(
        p.encode(p.MessageType.VERSION_REQUEST, p.DmVersionRequest(version=p.Version.WIN10)), 0
    )
    vsp.on_message(p.encode(p.MessageType.CAPABILITIES_REPORT, p.DmCapabilities(balloon=1)), 0)
    times = []
    for i in range(n):
        base = i * 510 * 512
        raw = p.encode(
            p.MessageType.BALLOON_RESPONSE,
            p.DmBalloonResponse(),
            ranges=[PageRange(base + k * 512, 512) for k in range(510)],
        )
        vsp.balloon(510 * 512)
        t0 = time.perf_counter()
        vsp.on_message(raw, 0)
        times.append(time.perf_counter() - t0)
    assert vsp.ballooned.pages == n * 510 * 512
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=int, default=1)
    ap.add_argument("--packets", type=int, default=common.pick(100_000, 30_000))
    args = ap.parse_args()
    run = common.run_info()
    repeats = common.pick(5, 2)
    out: dict[str, object] = {"gib": args.gib, "repeats": repeats, "goal_release_GiB_per_s": 10}
    cases = {
        "release_2MiB_scattered_GiB_per_s": lambda: bench_release(args.gib, 512, stride=2),
        "raw_punch_2MiB_scattered_GiB_per_s": lambda: bench_raw_punch(args.gib, 512, 2),
        "release_4KiB_scattered_GiB_per_s": lambda: bench_release(args.gib, 1, stride=2),
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):  # interleaved: every pattern sees the same machine load
        for k, f in cases.items():
            samples[k].append(f())
    for k, xs in samples.items():
        out[k] = common.spread(xs, 2)
        print(f"{k}: median {out[k]['median']} GiB/s (min {out[k]['min']}, max {out[k]['max']})")  # type: ignore[index]
    ring = bench_ring(args.packets)
    out.update({k: round(v, 3) for k, v in ring.items()})
    print(f"ring, host writes: {ring['host_write_pkts_per_s']:,.0f} packets/s")
    print(f"ring, host reads (batched): {ring['host_read_pkts_per_s']:,.0f} packets/s")
    print(
        f"ring, host part of a round trip: {ring['host_round_trip_us_median']:.1f} us (goal <= 50)"
    )
    out["vsp_balloon_response_510_ranges_us"] = round(bench_balloon_response(50), 1)
    print(
        f"VSP, one balloon response of 510 ranges: {out['vsp_balloon_response_510_ranges_us']} us"
    )
    common.finish("dynmem_host", out, run)


if __name__ == "__main__":
    main()
