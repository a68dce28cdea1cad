"""Live migration on loopback: pyhv worker -> worker, and QEMU -> QEMU with the same guest image,
side by side in one run.

For 256 MiB, 1 GiB and 4 GiB guests, idle and with `dirty` working sets of 16, 64 and 256 MiB
(where the working set fits the guest; 256 MiB idle and 16 MiB with PYHV_BENCH_QUICK=1): total time,
downtime (VP paused -> VP running on the destination), bytes sent and passes, each repeated
(3 times, once when quick) and reported as median with min-max.

Downtime, two figures per pyhv run: `downtime_ms`, the full one (from the pause request, the
VPs' parking included: what the guest sees), and `downtime_events_ms`, the window QEMU's QMP
events measure (QEMU 7.2 emits STOP once its vCPUs are paused and RESUME before they run
again): from every VP parked to just before they run at the destination. A row's
`downtime_pyhv_over_qemu` divides the matched pair (pyhv's `downtime_events_ms` by QEMU's
`downtime_events_ms`, `downtime_pyhv_over_qemu_basis` "events: ..."), and
`downtime_full_pyhv_over_qemu` pyhv's full downtime by the same QEMU figure.

Both sides migrate with the same convergence settings: auto-converge ON, throttling 20 % first,
+20 % per step, at most 95 %, downtime limit 300 ms, no bandwidth limit. QEMU
(`-M microvm -kernel pyhv-guest.elf`, PVH entry, serial on a socket to type `dirty`) runs with
KVM only (`-accel kvm -cpu host,-arch-capabilities`); if it cannot, its cells hold the error,
never figures of QEMU's software emulator.

pyhv migrates each row four times, authenticated (the default: every frame under GMAC),
encrypted (`encrypt`: AES-256-GCM), by post-copy (`postcopy`: the VM runs at the destination
at once, pages on demand; its row adds the blocktime p50/p99, the median of the runs') and
hybrid (`postcopy` with `postcopy_after=1`: pre-copy, then post-copy once one pass is done
unless the rest goes faster than a switch); QEMU by pre-copy, by post-copy (postcopy-ram,
`migrate-start-postcopy` right after `migrate`) and hybrid (`migrate-start-postcopy` once its
dirty bitmap was synced after its first pass; it too completes by pre-copy when the rest fits).
The hybrid runs of both sides go over a link limited to `--hybrid-bandwidth` (256 MiB/s by
default; pyhv's `bandwidth`, QEMU's `max-bandwidth`): unlimited, loopback carries every
working set here faster than the guest rewrites it and neither side ever switches. Idle rows
have none (an idle guest's rest fits after its first pass: a hybrid is its pre-copy).
The stream alone is measured against the raw socket (1 MiB PAGES frames sealed both ways, to a
sink process that checks them).

Both totals are divided by the same fixed wire limit per row: the guest's distinct non-zero
memory at the start of the migration (4 KiB pages that are not all zero, each counted once, read
from the source process's guest RAM just before the migration starts: pyhv's memfd, QEMU's
anonymous mapping through /proc/PID/mem; the median of both sides is the row's figure) divided by the loopback bandwidth of this run (a TCP bulk
transfer of 256 MiB between two processes, repeated before every row and after the last; the
median of those). Rows with a working set also give each total over the limit of the same
transfer with one core held by a spinning process (`wire_limit_one_core_busy_s`,
`total_over_busy_limit`): the guest's `dirty` loop holds one of the host's cores during those
migrations. Writes bench/results/migration.json and ends stdout with the same JSON object;
all figures were measured on PVM (this machine's KVM, docs/migration.md).

pyhv sends pages over `--streams` TCP connections (MigrationOptions.streams; QEMU 7.2 uses one:
its multifd is not used here, as its defaults have it off).

    .venv/bin/python bench/migration.py [--no-qemu] [--sizes 256M 1G 4G] [--dirty 0 16]
        [--repeats N] [--streams N] [--hybrid-bandwidth MIB_S]
    (PYHV_BENCH_QUICK=1: fewer rows and repetitions)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

TOKEN = "bench-migration-token-0123456789"
DOWNTIME_MS = 300  # QEMU's default downtime-limit; pyhv's downtime target set the same
BANDWIDTH = 16 << 30  # bytes/s for QEMU's max-bandwidth: in effect no limit on loopback
STREAMS = 2  # pyhv's TCP streams (one sending thread each): as many as this machine's cores
SETTLE = 1.5  # seconds the workload runs before the migration starts
HYBRID_AFTER = 1  # passes before a hybrid migration switches to post-copy (both sides)
#: The link limit of the hybrid runs (both sides): unlimited loopback carries every working set
#: here faster than the guest rewrites it, so neither side would ever switch to post-copy
HYBRID_BANDWIDTH = 256 << 20
WIRE_BYTES = 256 << 20  # one loopback bandwidth measurement
PAGE = 4096
#: The same convergence settings on both sides (pyhv's MigrationOptions / QEMU's parameters)
CONVERGENCE = {"auto_converge": True, "throttle_initial": 0.2, "throttle_step": 0.2,
               "throttle_max": 0.95}  # fmt: skip
QEMU_CONVERGENCE = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 20,
                    "max-cpu-throttle": 95}  # fmt: skip

_SINK = """
import socket, sys, time
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
buf = memoryview(bytearray(1 << 20))
total, got, t0 = int(sys.argv[1]), 0, None
while got < total:
    n = c.recv_into(buf)
    if not n:
        break
    if t0 is None:
        t0 = time.perf_counter()
    got += n
print(got, time.perf_counter() - t0, flush=True)
"""


def loopback_bandwidth(total: int = WIRE_BYTES) -> float:
    """Bytes/s of one TCP stream on loopback between two processes: this one sending 1 MiB
    buffers of random bytes, a sink process receiving into a reused buffer."""
    sink = subprocess.Popen(
        [sys.executable, "-c", _SINK, str(total)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        src = mmap.mmap(-1, 1 << 20)
        src.write(os.urandom(1 << 20))
        with socket.create_connection(("127.0.0.1", port)) as s:
            for _ in range(total >> 20):
                s.sendall(src)
        got, seconds = sink.stdout.readline().split()
        if int(got) != total:
            raise RuntimeError(f"the sink received {got} of {total} bytes")
        return total / float(seconds)
    finally:
        sink.kill()
        sink.wait()


_FRAME_SINK = """
import socket, sys, time
sys.path.insert(0, sys.argv[3])
from pyhv.migration.stream import FrameSocket
srv = socket.create_server(("127.0.0.1", 0))
print(srv.getsockname()[1], flush=True)
c, _ = srv.accept()
fs = FrameSocket(c)
fs.seal(b"\\x02" * 32, b"\\x01" * 32, sys.argv[2] == "1")
buf = memoryview(bytearray(1 << 20))
total, got, t0 = int(sys.argv[1]), 0, None
while got < total:
    ftype, flags, length, count, addr, check = fs.recv_header()
    if t0 is None:
        t0 = time.perf_counter()
    fs.recv_payload_into(buf[:length], ftype, flags, count, addr, check)
    got += length
print(got, time.perf_counter() - t0, flush=True)
"""


@contextlib.contextmanager
def one_core_busy() -> Any:
    """A process spinning on one CPU meanwhile: what a guest's `dirty` loop takes from the
    host (its VP holds one core), to measure the link beside it as a migration has it."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.1)  # spinning before the transfer starts
        yield
    finally:
        spin.kill()
        spin.wait()


def stream_bandwidth(encrypt: bool, total: int = WIRE_BYTES) -> float:
    """Page bytes/s of the migration stream itself on loopback, sealed as after the handshake
    (GMAC, or AES-GCM with `encrypt`): 1 MiB PAGES frames of random bytes to a sink process
    that checks each into a reused buffer; the same transfer as :func:`loopback_bandwidth`."""
    from pyhv.migration.stream import Frame, FrameSocket

    sink = subprocess.Popen(
        [sys.executable, "-c", _FRAME_SINK, str(total), "1" if encrypt else "0", str(ROOT)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        src = os.urandom(1 << 20)
        fs = FrameSocket(socket.create_connection(("127.0.0.1", port)))
        fs.seal(b"\x01" * 32, b"\x02" * 32, encrypt)
        for i in range(total >> 20):
            buf = fs.payload_buffer(len(src))  # as the source copies guest pages
            buf[:] = src
            fs.send(Frame.PAGES, buf, count=256, addr=i << 20)
        got, seconds = sink.stdout.readline().split()
        fs.close()
        if int(got) != total:
            raise RuntimeError(f"the frame sink received {got} of {total} bytes")
        return total / float(seconds)
    finally:
        sink.kill()
        sink.wait()


def nonzero_memory(pid: int) -> tuple[int, list[str]]:
    """Bytes of the 4 KiB pages that are not all zero in the memfds process `pid` holds (its
    guest RAM), each page counted once; and the memfds' names. Holes are skipped unread."""
    total, names, seen = 0, [], set()
    for fd_link in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd_link)
        except OSError:
            continue
        if not target.startswith("/memfd:"):
            continue
        fd = os.open(fd_link, os.O_RDONLY)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            names.append(target.removeprefix("/memfd:").removesuffix(" (deleted)"))
            total += _nonzero_pages(fd, st.st_size) * PAGE
        finally:
            os.close(fd)
    return total, sorted(names)


def nonzero_anonymous_memory(pid: int, size: int) -> int:
    """Bytes of the non-zero 4 KiB pages of QEMU's guest RAM: the largest anonymous read-write
    mapping of process `pid` at least `size` bytes long, read through /proc/PID/mem (pages never
    touched read as the kernel's zero page: nothing is allocated). QEMU keeps its RAM anonymous,
    as it runs by default: a memfd backend would make its zero-page scan allocate every page."""
    best: tuple[int, int] | None = None
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 or not fields[1].startswith("rw"):
            continue  # a file, [heap], [stack]...: not guest RAM
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if hi - lo >= size and (best is None or hi - lo > best[1] - best[0]):
            best = (lo, hi)
    if best is None:
        raise RuntimeError(f"no anonymous mapping of {size} bytes in QEMU (pid {pid})")
    pages = 0
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for pos in range(best[0], best[1], 64 << 20):
            mem.seek(pos)
            data = mem.read(min(64 << 20, best[1] - pos))
            words = np.frombuffer(data, dtype=np.uint64, count=(len(data) // PAGE) * PAGE // 8)
            pages += int(words.reshape(-1, PAGE // 8).any(axis=1).sum())
    return pages * PAGE


def _nonzero_pages(fd: int, size: int) -> int:
    pages, off, chunk = 0, 0, 64 << 20
    while off < size:
        try:
            start = os.lseek(fd, off, os.SEEK_DATA)
        except OSError:  # no data after off
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        for pos in range(start - start % PAGE, end, chunk):
            data = os.pread(fd, min(chunk, end - pos), pos)
            usable = len(data) - len(data) % PAGE
            words = np.frombuffer(data, dtype=np.uint64, count=usable // 8)
            pages += int(words.reshape(-1, PAGE // 8).any(axis=1).sum())
        off = end
    return pages


# --- pyhv ---------------------------------------------------------------------------------


def run_pyhv(
    memory: str,
    dirty: int,
    encrypt: bool = False,
    postcopy: bool = False,
    streams: int = 1,
    postcopy_after: int = 0,
    bandwidth: int = 0,
    preempt: bool = True,
) -> dict[str, Any]:
    from pyhv.guest_image import image_path
    from pyhv.migration.worker import IncomingWorker, migrate_worker
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    src = WorkerProcess(VmConfig.create(image=image_path(), memory=memory))
    dst = IncomingWorker(TOKEN)
    try:
        src.start()
        src.serial.read_until(b"pyhv> ", 30)
        if dirty:
            src.send(f"dirty {dirty}\r".encode())
            src.serial.read_until(b"pyhv> ", 30)
            time.sleep(SETTLE)
        dst.start()
        addr = dst.wait_listening()
        assert src.pid is not None
        nonzero, memfds = nonzero_memory(src.pid)
        r = migrate_worker(
            src,
            addr,
            TOKEN,
            {
                "downtime_target": DOWNTIME_MS / 1000,
                "bandwidth": bandwidth,
                "verify": False,  # QEMU does not checksum RAM either
                "encrypt": encrypt,
                "streams": streams,
                **CONVERGENCE,
                **(
                    {
                        "postcopy": True,
                        "postcopy_after": postcopy_after,
                        "postcopy_preempt": preempt,
                    }
                    if postcopy
                    else {}
                ),
            },
        )
        dst.wait_migrated(30)
        dst.send(b"ticks\r")
        alive = b"ticks:" in dst.serial.read_until(b"pyhv> ", 30)
        return {
            "total_s": round(r["total_time"], 4),
            "downtime_ms": round(r["downtime"] * 1000, 2),
            # the window QEMU's events measure (every VP parked -> just before they run):
            # pre-copy only (0 for post-copy, whose switch is timed apart)
            "downtime_events_ms": round(r.get("downtime_events", 0.0) * 1000, 3),
            "bytes_sent": r["bytes_sent"],
            "passes": r["passes"],
            "pages_sent": r["pages_sent"],
            "final_pages": r["final_pages"],
            "throttle_percent": r["throttle_percent"],
            "downtime_parts_ms": r["downtime_parts"],
            "realtime": r.get("realtime", {}),  # threads raised to SCHED_FIFO for the pause
            "guest_answers_at_destination": alive,
            "nonzero_bytes_at_start": nonzero,
            "memfds": memfds,
            **({"postcopy": r["postcopy"], "switched": bool(r["postcopy"])} if postcopy else {}),
        }
    finally:
        dst.close()
        src.close()


# --- QEMU ---------------------------------------------------------------------------------


def _connect_unix(path: str) -> socket.socket:
    """A Unix socket connected to `path`, waiting up to 10 s for QEMU to create it."""
    sock = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            sock.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    return sock


class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = _connect_unix(path)
        self.f = self.sock.makefile("rwb")
        # every event read so far, in order: read while waiting for replies, kept for the
        # downtime measured from STOP (source) to RESUME (destination)
        self.events: list[dict[str, Any]] = []
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP closed")
        return json.loads(line)  # type: ignore[no-any-return]

    def _read(self) -> dict[str, Any]:
        while True:
            msg = self._line()
            if "event" not in msg:
                return msg
            self.events.append(msg)

    def event_time(self, name: str, last: bool = False, timeout: float = 10) -> float | None:
        """The host wall-clock time (s, µs resolution) of the first (or `last`) `name` event
        read so far; waits up to `timeout` for one if none was read yet, None if none came."""
        deadline = time.monotonic() + timeout
        while True:
            times = [
                e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
                for e in self.events
                if e.get("event") == name
            ]
            if times:
                return times[-1] if last else times[0]
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                msg = self._line()
            except TimeoutError:
                return None
            finally:
                self.sock.settimeout(None)
            if "event" in msg:
                self.events.append(msg)

    def cmd(self, name: str, **args: Any) -> Any:
        self.f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.f.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply.get("return")


class Serial:
    def __init__(self, path: str) -> None:
        self.sock = _connect_unix(path)
        self.buf = b""

    def until(self, marker: bytes, timeout: float = 60) -> bytes:
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{marker!r} not seen; got {self.buf[-200:]!r}")
            chunk = self.sock.recv(4096)
            if not chunk:
                raise RuntimeError("serial closed")
            self.buf += chunk
        out, _, self.buf = self.buf.partition(marker)
        return out + marker

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def qemu_cmd(qemu: str, image: Path, memory: str, d: str, name: str) -> list[str]:
    """QEMU with KVM (never its emulator)."""
    return [
        qemu, "-M", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off",
        *common.QEMU_KVM, "-m", memory, "-smp", "1", "-kernel", str(image),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"unix:{d}/{name}-serial.sock,server=on,wait=off",
        "-qmp", f"unix:{d}/{name}-qmp.sock,server=on,wait=off",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip


def _bytes(memory: str) -> int:
    return int(memory[:-1]) << (30 if memory.endswith("G") else 20)


def _stderr_tail(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.kill()
    assert proc.stderr is not None
    return proc.stderr.read().decode(errors="replace").strip()[-400:]


def run_qemu(
    qemu: str,
    memory: str,
    dirty: int,
    postcopy: bool = False,
    postcopy_after: int = 0,
    bandwidth: int = BANDWIDTH,
) -> dict[str, Any]:
    """One QEMU migration; with `postcopy`, switched to post-copy right after `migrate`, or
    with `postcopy_after` N once the dirty bitmap was synced after N passes (its first sync
    comes at the start: N + 1 syncs)."""
    from pyhv.guest_image import image_path

    image = image_path()
    with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as d:
        port_sock = socket.create_server(("127.0.0.1", 0))
        port = port_sock.getsockname()[1]
        port_sock.close()
        procs = [
            subprocess.Popen(qemu_cmd(qemu, image, memory, d, "src"), stderr=subprocess.PIPE),
            subprocess.Popen(
                [*qemu_cmd(qemu, image, memory, d, "dst"), "-incoming", f"tcp:127.0.0.1:{port}"],
                stderr=subprocess.PIPE,
            ),
        ]
        try:
            try:
                serial = Serial(f"{d}/src-serial.sock")
                serial.until(b"pyhv> ", 120)
            except (OSError, RuntimeError, TimeoutError) as e:
                raise RuntimeError(
                    f"QEMU with KVM did not boot: {_stderr_tail(procs[0]) or e}"
                ) from e
            if dirty:
                serial.send(f"dirty {dirty}\r".encode())
                serial.until(b"pyhv> ", 60)
                time.sleep(SETTLE)
            src, dst = Qmp(f"{d}/src-qmp.sock"), Qmp(f"{d}/dst-qmp.sock")
            dst_serial = Serial(f"{d}/dst-serial.sock")
            src.cmd(
                "migrate-set-capabilities",
                capabilities=[
                    {"capability": "auto-converge", "state": CONVERGENCE["auto_converge"]},
                    *([{"capability": "postcopy-ram", "state": True}] if postcopy else []),
                ],
            )
            if postcopy:  # both sides; the destination measures the blocktime
                dst.cmd(
                    "migrate-set-capabilities",
                    capabilities=[
                        {"capability": "postcopy-ram", "state": True},
                        {"capability": "postcopy-blocktime", "state": True},
                    ],
                )
            src.cmd(
                "migrate-set-parameters",
                **{"downtime-limit": DOWNTIME_MS, "max-bandwidth": bandwidth, **QEMU_CONVERGENCE},
            )
            nonzero = nonzero_anonymous_memory(procs[0].pid, _bytes(memory))
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            asked = postcopy and postcopy_after <= 0
            if asked:  # at once, as pyhv's --postcopy
                src.cmd("migrate-start-postcopy")
            deadline = time.monotonic() + 300
            info: dict[str, Any] = {}
            seen: set[str] = set()
            while time.monotonic() < deadline:
                info = src.cmd("query-migrate")
                seen.add(str(info.get("status")))
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                syncs = int(info.get("ram", {}).get("dirty-sync-count", 0))
                if postcopy and not asked and syncs > postcopy_after:
                    asked = True
                    try:
                        src.cmd("migrate-start-postcopy")
                    except RuntimeError:
                        pass  # refused once it completes by pre-copy: it ends on its own
                time.sleep(0.005 if postcopy and not asked else 0.02)
            if info.get("status") != "completed":
                src.cmd("migrate_cancel")
                raise RuntimeError(
                    f"QEMU migration {info.get('status')}: {info.get('error-desc', '')}"
                )
            for _ in range(100):
                if dst.cmd("query-status").get("status") == "running":
                    break
                time.sleep(0.02)
            dst_serial.send(b"\rticks\r")
            alive = b"ticks:" in dst_serial.until(b"ticks: ", 30) + dst_serial.until(b"pyhv> ", 30)
            ram = info.get("ram", {})
            extra: dict[str, Any] = {}
            if postcopy:  # QEMU 7.2 gives the total and per vCPU, no percentiles
                there = dst.cmd("query-migrate")
                extra["postcopy"] = {
                    "blocktime_total_ms": there.get("postcopy-blocktime"),
                    "vcpu_blocktime_ms": there.get("postcopy-vcpu-blocktime"),
                }
                extra["switched"] = "postcopy-active" in seen or bool(
                    info.get("ram", {}).get("postcopy-bytes", 0)
                )
                # QEMU 7.2 reports no valid downtime for post-copy (measured: 1.5e7 ms)
                if float(info.get("downtime", 0)) > info.get("total-time", 0):
                    info["downtime"] = None
            # measured as pyhv's: VM paused at the source (its last STOP, the final stage) to
            # running at the destination (RESUME), from the events' host wall-clock µs
            # timestamps; QEMU's own figure is whole ms, taken at the source alone. QEMU 7.2
            # sends STOP once the vCPUs are paused and RESUME before they run again: the window
            # lies inside the pause (a lower bound, in QEMU's favour). Read last: a timeout
            # spoils the reader.
            stopped = src.event_time("STOP", last=True)
            resumed = dst.event_time("RESUME")
            events_ms = (
                None if stopped is None or resumed is None else round((resumed - stopped) * 1000, 3)
            )
            return {
                **extra,
                "total_s": info.get("total-time", 0) / 1000,
                "downtime_ms": None
                if info.get("downtime") is None
                else float(info.get("downtime", 0)),
                "downtime_events_ms": events_ms,
                "bytes_sent": int(ram.get("transferred", 0)),
                "passes": int(ram.get("dirty-sync-count", 0)),
                "throttle_percent": float(info.get("cpu-throttle-percentage", 0)),
                "guest_answers_at_destination": alive,
                "nonzero_bytes_at_start": nonzero,
            }
        finally:
            for p in procs:
                p.kill()
                p.wait()


def qemu_kvm_error(qemu: str) -> str | None:
    """None if QEMU boots the guest with KVM here, else why not (QEMU's own message)."""
    from pyhv.guest_image import image_path

    with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as d:
        p = subprocess.Popen(
            qemu_cmd(qemu, image_path(), "128M", d, "probe"), stderr=subprocess.PIPE
        )
        try:
            Serial(f"{d}/probe-serial.sock").until(b"pyhv> ", 60)
            return None
        except (OSError, RuntimeError, TimeoutError) as e:
            return f"QEMU with KVM did not boot the guest: {_stderr_tail(p) or e}"
        finally:
            p.kill()
            p.wait()


# --- main ---------------------------------------------------------------------------------


def _summary(runs: list[dict[str, Any]], limit_s: float) -> dict[str, Any]:
    """Median with min-max of a side's repetitions of one row, over the row's wire limit."""
    totals = [r["total_s"] for r in runs]
    over = [t / limit_s for t in totals]
    return {
        "total_s": common.spread(totals, 4),
        "downtime_ms": common.spread([r["downtime_ms"] for r in runs], 2),
        # the window QEMU's STOP/RESUME events span (every VP parked -> just before they run)
        "downtime_events_ms": common.spread([r["downtime_events_ms"] for r in runs], 3),
        "bytes_sent": common.spread([r["bytes_sent"] for r in runs], 0),
        "passes": common.spread([r["passes"] for r in runs], 0),
        "nonzero_bytes_at_start": common.spread([r["nonzero_bytes_at_start"] for r in runs], 0),
        "total_over_limit": round(statistics.median(over), 2),
        "total_over_limit_range": [round(min(over), 2), round(max(over), 2)],
        "guest_answers_at_destination": all(r["guest_answers_at_destination"] for r in runs),
        "runs": runs,
    }


def _postcopy_summary(runs: list[dict[str, Any]], limit_s: float) -> dict[str, Any]:
    """pyhv's post-copy or hybrid runs: as _summary, with how many switched to post-copy and
    the medians of their blocktime p50/p99, faults and pages on request (None if none did)."""
    out = _summary(runs, limit_s)
    switched = [r["postcopy"] for r in runs if r["switched"]]
    out["switched_runs"] = len(switched)
    for k in ("blocktime_p50_ms", "blocktime_p99_ms", "faults", "requested_pages"):
        out[k] = statistics.median(p[k] for p in switched) if switched else None
    return out


def _qemu_postcopy_summary(runs: list[dict[str, Any]], limit_s: float) -> dict[str, Any]:
    """QEMU's post-copy or hybrid runs: total over the row's wire limit, how many switched,
    the blocktime total (QEMU 7.2 gives no percentiles), the downtime where QEMU reports a
    valid one (it does not once it switched)."""
    totals = [r["total_s"] for r in runs]
    downs = [r["downtime_ms"] for r in runs if r["downtime_ms"] is not None]
    events = [r["downtime_events_ms"] for r in runs]
    return {
        "total_s": common.spread(totals, 4),
        "total_over_limit": round(statistics.median(totals) / limit_s, 2),
        "downtime_ms": common.spread(downs, 2) if downs else None,
        # STOP (its last) at the source to RESUME at the destination, as pre-copy's
        "downtime_events_ms": None if None in events else common.spread(events, 3),
        "switched_runs": sum(1 for r in runs if r["switched"]),
        "blocktime_total_ms": statistics.median(
            r["postcopy"]["blocktime_total_ms"] or 0 for r in runs
        ),
        "runs": runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-qemu", action="store_true", help="pyhv only (QEMU's cells say so)")
    ap.add_argument("--sizes", nargs="+", default=common.pick(["256M", "1G", "4G"], ["256M"]))
    ap.add_argument(
        "--dirty", type=int, nargs="+", default=common.pick([0, 16, 64, 256], [0, 16]),
        help="working sets in MiB (0: idle)",
    )  # fmt: skip
    ap.add_argument("--repeats", type=int, default=common.pick(3, 1))
    ap.add_argument(
        "--streams", type=int, default=STREAMS, help=f"pyhv's TCP streams (default {STREAMS})"
    )
    ap.add_argument(
        "--hybrid-bandwidth", type=int, default=HYBRID_BANDWIDTH >> 20,
        help=f"MiB/s the hybrid runs' link carries, both sides (default {HYBRID_BANDWIDTH >> 20}; "
        "0: no limit)",
    )  # fmt: skip
    args = ap.parse_args()
    hy_bw = args.hybrid_bandwidth << 20
    run = common.run_info()
    sizes, workloads, repeats = args.sizes, args.dirty, args.repeats
    qemu = None if args.no_qemu else common.qemu_binary()
    if args.no_qemu:
        qemu_error: str | None = "not run (--no-qemu)"
    elif qemu is None:
        qemu_error = "qemu-system-x86_64 is not installed"
    else:
        qemu_error = qemu_kvm_error(qemu)
    print(f"QEMU: {qemu_error or 'with KVM'}", flush=True)
    bandwidths: list[float] = []
    raw: list[dict[str, Any]] = []
    for memory in sizes:
        mib = int(memory[:-1]) * (1024 if memory.endswith("G") else 1)
        for dirty in workloads:
            row: dict[str, Any] = {"memory": memory, "dirty_mib": dirty}
            raw.append(row)
            if dirty >= mib:
                row["skipped"] = "the working set does not fit in the guest"
                continue
            pyhv_runs: list[dict[str, Any]] = []
            sealed_runs: list[dict[str, Any]] = []
            postcopy_runs: list[dict[str, Any]] = []
            hybrid_runs: list[dict[str, Any]] = []
            qemu_runs: list[dict[str, Any]] = []
            qemu_postcopy_runs: list[dict[str, Any]] = []
            qemu_hybrid_runs: list[dict[str, Any]] = []
            for _ in range(repeats):  # the wire, pyhv (authenticated, encrypted), QEMU take turns
                bandwidths.append(loopback_bandwidth())
                pyhv_runs.append(run_pyhv(memory, dirty, streams=args.streams))
                sealed_runs.append(run_pyhv(memory, dirty, encrypt=True, streams=args.streams))
                # post-copy takes one stream (MigrationOptions refuses it with more)
                postcopy_runs.append(run_pyhv(memory, dirty, postcopy=True))
                if dirty:  # an idle guest's rest always fits after pass 1: no hybrid row
                    hybrid_runs.append(
                        run_pyhv(
                            memory,
                            dirty,
                            postcopy=True,
                            postcopy_after=HYBRID_AFTER,
                            bandwidth=hy_bw,
                        )
                    )
                if qemu is not None and qemu_error is None:
                    try:
                        qemu_runs.append(run_qemu(qemu, memory, dirty))
                        qemu_postcopy_runs.append(run_qemu(qemu, memory, dirty, postcopy=True))
                        if dirty:
                            qemu_hybrid_runs.append(
                                run_qemu(
                                    qemu, memory, dirty, True, HYBRID_AFTER, hy_bw or BANDWIDTH
                                )
                            )
                    except Exception as e:  # noqa: BLE001 - the row says why
                        row["qemu_error"] = f"{type(e).__name__}: {e}"
                        break
            row["pyhv_runs"], row["qemu_runs"] = pyhv_runs, qemu_runs
            row["pyhv_encrypted_runs"] = sealed_runs
            row["pyhv_postcopy_runs"] = postcopy_runs
            row["pyhv_hybrid_runs"] = hybrid_runs
            # QEMU switches after its first pass ends (migrate-start-postcopy at once)
            row["qemu_postcopy_runs"] = qemu_postcopy_runs
            row["qemu_hybrid_runs"] = qemu_hybrid_runs
            p, e, c = pyhv_runs[-1], sealed_runs[-1], postcopy_runs[-1]
            h = hybrid_runs[-1] if hybrid_runs else None
            print(
                f"{memory:>5} dirty {dirty:>3} MiB | pyhv total {p['total_s']:.3f} s, downtime "
                f"{p['downtime_ms']:.2f} ms (full), {p['downtime_events_ms']:.3f} ms (as QEMU's "
                f"events), {p['bytes_sent'] / 2**20:.1f} MiB sent, non-zero "
                f"{p['nonzero_bytes_at_start'] / 2**20:.1f} MiB | encrypted total "
                f"{e['total_s']:.3f} s, downtime {e['downtime_ms']:.1f} ms | post-copy total "
                f"{c['total_s']:.3f} s, downtime {c['downtime_ms']:.1f} ms, blocktime p50 "
                f"{c['postcopy']['blocktime_p50_ms']:.2f} p99 "
                f"{c['postcopy']['blocktime_p99_ms']:.2f} ms"
                + (
                    ""
                    if h is None
                    else f" | hybrid total {h['total_s']:.3f} s, downtime "
                    f"{h['downtime_ms']:.1f} ms, switched {h['switched']}"
                )
                + (
                    f" | qemu total {qemu_runs[-1]['total_s']:.3f} s, downtime "
                    f"{qemu_runs[-1]['downtime_ms']:.0f} ms (reported), "
                    f"{qemu_runs[-1]['downtime_events_ms']} ms (events), non-zero "
                    f"{qemu_runs[-1]['nonzero_bytes_at_start'] / 2**20:.1f} MiB"
                    if qemu_runs
                    else f" | qemu: {row.get('qemu_error') or qemu_error}"
                ),
                flush=True,
            )
    bandwidths.append(loopback_bandwidth())
    bw = statistics.median(bandwidths)
    # The same transfer with one of the host's cores held, as the guest's `dirty` loop holds
    # one during a migration with a working set: what the link gives a migration here.
    busy = []
    for _ in range(max(repeats, 3)):
        with one_core_busy():
            busy.append(loopback_bandwidth())
    bw_busy = statistics.median(busy)
    rows = []
    for row in raw:
        if "skipped" in row:
            rows.append(row)
            continue
        pyhv_runs, qemu_runs = row.pop("pyhv_runs"), row.pop("qemu_runs")
        sealed_runs = row.pop("pyhv_encrypted_runs")
        postcopy_runs = row.pop("pyhv_postcopy_runs")
        hybrid_runs = row.pop("pyhv_hybrid_runs")
        # one fixed wire limit for both sides: the guest's non-zero memory at the start
        nonzero = statistics.median(r["nonzero_bytes_at_start"] for r in pyhv_runs + qemu_runs)
        row["nonzero_bytes_at_start"] = round(nonzero)
        row["wire_limit_s"] = round(nonzero / bw, 6)
        row["pyhv"] = _summary(pyhv_runs, nonzero / bw)
        pyhv_events = [r["downtime_events_ms"] for r in pyhv_runs]
        row["pyhv_encrypted"] = _summary(sealed_runs, nonzero / bw)
        row["pyhv_postcopy"] = _postcopy_summary(postcopy_runs, nonzero / bw)
        if row["dirty_mib"]:  # the guest holds a core: the link as the migration had it
            row["wire_limit_one_core_busy_s"] = round(nonzero / bw_busy, 6)
            for side in ("pyhv", "pyhv_postcopy"):
                row[side]["total_over_busy_limit"] = round(
                    row[side]["total_s"]["median"] * bw_busy / nonzero, 2
                )
        if hybrid_runs:
            row["pyhv_hybrid"] = _postcopy_summary(hybrid_runs, nonzero / bw)
            row["pyhv_hybrid"]["postcopy_after"] = HYBRID_AFTER
        qemu_pc = row.pop("qemu_postcopy_runs")
        qemu_hy = row.pop("qemu_hybrid_runs")
        if qemu_pc:
            row["qemu_postcopy"] = _qemu_postcopy_summary(qemu_pc, nonzero / bw)
            if row["dirty_mib"]:
                row["qemu_postcopy"]["total_over_busy_limit"] = round(
                    row["qemu_postcopy"]["total_s"]["median"] * bw_busy / nonzero, 2
                )
        if qemu_hy:
            row["qemu_hybrid"] = _qemu_postcopy_summary(qemu_hy, nonzero / bw)
            row["qemu_hybrid"]["postcopy_after"] = HYBRID_AFTER
        row["encrypted_total_over_authenticated"] = round(
            row["pyhv_encrypted"]["total_s"]["median"] / row["pyhv"]["total_s"]["median"], 2
        )
        error = row.pop("qemu_error", None) or qemu_error
        if qemu_runs and not error:
            row["qemu"] = _summary(qemu_runs, nonzero / bw)
            if row["dirty_mib"]:
                row["qemu"]["total_over_busy_limit"] = round(
                    row["qemu"]["total_s"]["median"] * bw_busy / nonzero, 2
                )
            # measured as pyhv's (µs, STOP at the source to RESUME at the destination) where
            # every run has both events; QEMU's own whole-ms figure stays in downtime_ms
            events = [r["downtime_events_ms"] for r in qemu_runs]
            if None not in events:
                row["qemu"]["downtime_events_ms"] = common.spread(events, 3)
            # Like for like: QEMU's events (STOP once its vCPUs are paused, RESUME before they
            # run) against pyhv's same window (every VP parked -> just before they run); pyhv's
            # full downtime (from the pause request: what the guest sees) kept beside it.
            matched = "downtime_events_ms" in row["qemu"] and all(pyhv_events)
            q_down = (row["qemu"].get("downtime_events_ms") or row["qemu"]["downtime_ms"])["median"]
            p_down = row["pyhv"]["downtime_events_ms" if matched else "downtime_ms"]["median"]
            row["downtime_pyhv_over_qemu_basis"] = (
                "events: both sides from every vCPU parked to just before they run"
                if matched
                else "reported: pyhv's full downtime over QEMU's own figure"
                if "downtime_events_ms" not in row["qemu"]
                else "full: pyhv's full downtime over QEMU's events"
            )
            row["downtime_pyhv_over_qemu"] = round(p_down / q_down, 2) if q_down else None
            row["downtime_full_pyhv_over_qemu"] = (
                round(row["pyhv"]["downtime_ms"]["median"] / q_down, 2) if q_down else None
            )
            print(
                f"{row['memory']:>5} dirty {row['dirty_mib']:>3} MiB | downtime pyhv / QEMU: "
                f"{row['downtime_pyhv_over_qemu']} ({row['downtime_pyhv_over_qemu_basis']}), "
                f"{row['downtime_full_pyhv_over_qemu']} with pyhv's full downtime",
                flush=True,
            )
            # post-copy and hybrid on the same matched window (QEMU 7.2 reports no valid
            # downtime once it switched; its events do)
            for mine, theirs in (("postcopy", "qemu_postcopy"), ("hybrid", "qemu_hybrid")):
                q_ev = (row.get(theirs) or {}).get("downtime_events_ms")
                p_ev = (row.get(f"pyhv_{mine}") or {}).get("downtime_events_ms")
                row[f"{mine}_downtime_pyhv_over_qemu"] = (
                    round(p_ev["median"] / q_ev["median"], 2)
                    if p_ev and q_ev and q_ev["median"] and p_ev["median"]
                    else None
                )
        else:
            row["qemu"] = {"error": error}
            row["downtime_pyhv_over_qemu"] = None
            row["downtime_full_pyhv_over_qemu"] = None
            row["postcopy_downtime_pyhv_over_qemu"] = None
            row["hybrid_downtime_pyhv_over_qemu"] = None
        rows.append(row)
    print(
        f"loopback TCP: median {bw / 1e6:.0f} MB/s of {len(bandwidths)} transfers, "
        f"{bw_busy / 1e6:.0f} MB/s with one core held"
    )
    # the stream alone, against the raw socket: what sealing each frame costs on the wire
    raw, authenticated, encrypted = [], [], []
    for _ in range(max(repeats, 3)):  # a few seconds: taking turns, even when quick
        raw.append(loopback_bandwidth())
        authenticated.append(stream_bandwidth(False))
        encrypted.append(stream_bandwidth(True))
    stream = {
        "raw_tcp_bytes_per_s": common.spread(raw, 0),
        "authenticated_bytes_per_s": common.spread(authenticated, 0),
        "encrypted_bytes_per_s": common.spread(encrypted, 0),
        "frame_bytes": 1 << 20,
        "authenticated_over_raw": round(
            statistics.median(authenticated) / statistics.median(raw), 2
        ),
        "encrypted_over_raw": round(statistics.median(encrypted) / statistics.median(raw), 2),
    }
    print(
        "stream: raw TCP {:.0f} MB/s, authenticated {:.0f} MB/s, encrypted {:.0f} MB/s".format(
            *(statistics.median(x) / 1e6 for x in (raw, authenticated, encrypted))
        )
    )
    result = {
        "repeats": repeats,
        "convergence": {"pyhv": CONVERGENCE, "qemu": {"auto-converge": True, **QEMU_CONVERGENCE}},
        "downtime_limit_ms": DOWNTIME_MS,
        "pyhv_streams": args.streams,
        "hybrid": {"postcopy_after": HYBRID_AFTER, "bandwidth_bytes_per_s": hy_bw},
        "loopback_bytes_per_s": common.spread(bandwidths, 0),
        "loopback_one_core_busy_bytes_per_s": common.spread(busy, 0),
        "cpus": os.cpu_count(),
        "wire_bytes_per_transfer": WIRE_BYTES,
        "stream": stream,
        "qemu": {"error": qemu_error}
        if qemu_error
        else {"accel": "kvm", "cpu": common.QEMU_KVM[3]},
        "rows": rows,
    }
    common.finish("migration", result, run)


if __name__ == "__main__":
    main()
