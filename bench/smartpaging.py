"""What Smart Paging costs: the same 512 MiB Dynamic Memory VM started by a WorkerProcess with
the top 128 MiB of its RAM backed by a Smart Paging file and without, taking turns, from start()
to the shell prompt; and the end of Smart Paging (the file's pages copied into a memfd while the VPs
run, then the VPs paused while the pages they wrote since are copied again and the memfd swapped
in) with the file empty and with ~90 MiB of testlimit's pages in it. Median and
min-max of 5 pairs (2 with PYHV_BENCH_QUICK=1). Unjailed (no memory cgroup: nothing is paged
out, the copy reads the page cache). Writes bench/results/smartpaging.json and ends with it as
one JSON line."""

from __future__ import annotations

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

PAIRS = common.pick(5, 2)
MIB = 1 << 20
PAGED = 128 * MIB


class _Vm:
    """A worker process running the bundled guest, 512 MiB with Dynamic Memory."""

    def __init__(self, image: str, smart_paging: bool, tmp: Path) -> None:
        from pyhv.worker.config import VmConfig
        from pyhv.worker.process import WorkerProcess

        self.buf = bytearray()
        self.cond = threading.Condition()
        config = VmConfig.create(
            image=image,
            memory=512 * MIB,
            name="benchsp",
            dynamic_memory=True,
            minimum=128 * MIB,
            maximum=512 * MIB,
        )
        self.w = WorkerProcess(config, output=self._out)
        self.fd = -1
        if smart_paging:
            self.fd = os.open(tmp / "smart-paging.slp", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            os.ftruncate(self.fd, PAGED)
            self.w.smart_paging = (self.fd, PAGED)

    def _out(self, data: bytes) -> None:
        with self.cond:
            self.buf += data
            self.cond.notify_all()

    def until(self, marker: bytes, since: int = 0, timeout: float = 120) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: marker in self.buf[since:], timeout):
                raise SystemExit(f"no {marker!r} from the guest: {self.w.wait(1)}")

    def start(self) -> float:
        t0 = time.perf_counter()
        self.w.start()
        if self.fd >= 0:
            os.close(self.fd)  # the worker has its own
        self.until(b"pyhv> ")
        return time.perf_counter() - t0

    def type(self, command: str, marker: bytes) -> None:
        since = len(self.buf)
        self.w.send(command.encode() + b"\r")
        self.until(marker, since)

    def close(self) -> None:
        self.w.close()


def main() -> int:
    from pyhv.guest_image import image_path

    run = common.run_info()
    image = str(image_path())
    tmp = Path(tempfile.mkdtemp())
    warm = _Vm(image, True, tmp)
    warm.start()
    warm.close()
    starts: dict[str, list[float]] = {"memfd": [], "smart_paging": []}
    for _ in range(PAIRS):
        for kind in starts:
            vm = _Vm(image, kind == "smart_paging", tmp)
            starts[kind].append(vm.start() * 1000)
            vm.close()
    moves: dict[str, list[dict[str, int]]] = {"empty": [], "testlimit": []}
    for _ in range(PAIRS):
        for kind in moves:
            vm = _Vm(image, True, tmp)
            vm.start()
            if kind == "testlimit":
                vm.type("testlimit -m 470", b"committed")
                # The guest touches its pages at its pace (a fault each, under PVM): wait until
                # the file stops growing.
                path, last, still = tmp / "smart-paging.slp", -1, 0
                deadline = time.monotonic() + 120
                while still < 5 and time.monotonic() < deadline:
                    time.sleep(0.2)
                    blocks = path.stat().st_blocks
                    still = still + 1 if blocks == last and blocks else 0
                    last = blocks
            moves[kind].append(vm.w.end_smart_paging())
            vm.close()
    out: dict[str, object] = {"pairs": PAIRS, "paged_mib": PAGED // MIB}
    for kind, ms in starts.items():
        out[f"start_to_prompt_ms_{kind}"] = round(statistics.median(ms), 1)
        out[f"start_to_prompt_ms_{kind}_range"] = [round(min(ms), 1), round(max(ms), 1)]
    for kind, rs in moves.items():
        paused = [r["paused_us"] / 1000 for r in rs]
        out[f"move_paused_ms_{kind}"] = round(statistics.median(paused), 1)
        out[f"move_paused_ms_{kind}_range"] = [round(min(paused), 1), round(max(paused), 1)]
        out[f"move_copied_mib_{kind}"] = round(
            statistics.median(r["copied_bytes"] for r in rs) / MIB, 1
        )
        out[f"move_copied_paused_kib_{kind}"] = round(
            statistics.median(r.get("copied_paused_bytes", 0) for r in rs) / 1024, 1
        )
    for k, v in out.items():
        print(f"{k:40} {v}")
    common.finish("smartpaging", out, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
