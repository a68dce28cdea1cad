"""Live migration on loopback: pyhv worker -> worker, and QEMU -> QEMU with the same guest image,
side by side in one run.

For 256 MiB and 1 GiB guests, idle and with `dirty` working sets of 16, 64 and 256 MiB (where
the working set fits the guest): total time, downtime (VP paused -> VP running on the
destination), bytes sent, passes, and the physical limit (bytes that had to be sent / the
loopback bandwidth measured in this run). QEMU (`-M microvm -kernel pyhv-guest.elf`, PVH entry,
serial on a socket to type `dirty`) migrates between two processes with `migrate` over QMP,
downtime-limit and bandwidth set the same as pyhv's; with KVM when QEMU's KVM works on this
machine, else with TCG (said in the output). The last stdout line is one JSON object; all
figures were measured on PVM (this machine's KVM, docs/migration.md).

    .venv/bin/python bench/migration.py [--quick] [--no-qemu]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TOKEN = "bench-migration-token-0123456789"
DOWNTIME_MS = 300  # QEMU's default downtime-limit; pyhv's downtime target set the same
BANDWIDTH = 16 << 30  # bytes/s for both: in effect no limit on loopback
SETTLE = 1.5  # seconds the workload runs before the migration starts


def loopback_bandwidth(total: int = 512 << 20) -> float:
    """Bytes/s of one TCP stream on loopback, Python sending 1 MiB buffers and receiving into
    a reused buffer (the wire's own limit, nothing else)."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    took: list[float] = []

    def rx() -> None:
        c, _ = srv.accept()
        buf = memoryview(bytearray(1 << 20))
        got = 0
        t0 = time.perf_counter()
        while got < total:
            n = c.recv_into(buf)
            if not n:
                break
            got += n
        took.append(time.perf_counter() - t0)
        c.close()

    t = threading.Thread(target=rx)
    t.start()
    s = socket.create_connection(("127.0.0.1", port))
    src = mmap.mmap(-1, 1 << 20)
    src.write(os.urandom(1 << 20))
    for _ in range(total >> 20):
        s.sendall(src)
    t.join()
    s.close()
    srv.close()
    return total / took[0]


# --- pyhv ---------------------------------------------------------------------------------


def run_pyhv(memory: str, dirty: int) -> dict[str, Any]:
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
        r = migrate_worker(
            src,
            addr,
            TOKEN,
            {"downtime_target": DOWNTIME_MS / 1000, "bandwidth": 0, "verify": False},
        )
        dst.wait_migrated(30)
        dst.send(b"ticks\r")
        alive = b"ticks:" in dst.serial.read_until(b"pyhv> ", 30)
        return {
            "total_s": round(r["total_time"], 4),
            "downtime_ms": round(r["downtime"] * 1000, 2),
            "bytes_sent": r["bytes_sent"],
            "passes": r["passes"],
            "pages_sent": r["pages_sent"],
            "final_pages": r["final_pages"],
            "throttle_percent": r["throttle_percent"],
            "downtime_parts_ms": r["downtime_parts"],
            "guest_answers_at_destination": alive,
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
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError("QMP closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg  # type: ignore[no-any-return]

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


def qemu_cmd(qemu: str, image: Path, memory: str, accel: str, d: str, name: str) -> list[str]:
    cpu = "host" if accel == "kvm" else "max"
    return [
        qemu, "-M", "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=off",
        "-accel", accel, "-cpu", cpu, "-m", memory, "-smp", "1", "-kernel", str(image),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-serial", f"unix:{d}/{name}-serial.sock,server=on,wait=off",
        "-qmp", f"unix:{d}/{name}-qmp.sock,server=on,wait=off",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ]  # fmt: skip


def run_qemu(qemu: str, accel: str, memory: str, dirty: int) -> dict[str, Any]:
    from pyhv.guest_image import image_path

    image = image_path()
    with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as d:
        port_sock = socket.create_server(("127.0.0.1", 0))
        port = port_sock.getsockname()[1]
        port_sock.close()
        procs = [
            subprocess.Popen(
                qemu_cmd(qemu, image, memory, accel, d, "src"), stderr=subprocess.PIPE
            ),
            subprocess.Popen(
                [
                    *qemu_cmd(qemu, image, memory, accel, d, "dst"),
                    "-incoming",
                    f"tcp:127.0.0.1:{port}",
                ],
                stderr=subprocess.PIPE,
            ),
        ]
        try:
            serial = Serial(f"{d}/src-serial.sock")
            serial.until(b"pyhv> ", 120)
            if dirty:
                serial.send(f"dirty {dirty}\r".encode())
                serial.until(b"pyhv> ", 60)
                time.sleep(SETTLE)
            src, dst = Qmp(f"{d}/src-qmp.sock"), Qmp(f"{d}/dst-qmp.sock")
            dst_serial = Serial(f"{d}/dst-serial.sock")
            src.cmd(
                "migrate-set-parameters",
                **{"downtime-limit": DOWNTIME_MS, "max-bandwidth": BANDWIDTH},
            )
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            deadline = time.monotonic() + 300
            info: dict[str, Any] = {}
            while time.monotonic() < deadline:
                info = src.cmd("query-migrate")
                if info.get("status") in ("completed", "failed", "cancelled"):
                    break
                time.sleep(0.02)
            if info.get("status") != "completed":
                src.cmd("migrate_cancel")
                return {
                    "error": f"QEMU migration {info.get('status')}: {info.get('error-desc', '')}"
                }
            for _ in range(100):
                if dst.cmd("query-status").get("status") == "running":
                    break
                time.sleep(0.02)
            dst_serial.send(b"\rticks\r")
            alive = b"ticks:" in dst_serial.until(b"ticks: ", 30) + dst_serial.until(b"pyhv> ", 30)
            ram = info.get("ram", {})
            return {
                "total_s": info.get("total-time", 0) / 1000,
                "downtime_ms": float(info.get("downtime", 0)),
                "bytes_sent": int(ram.get("transferred", 0)),
                "passes": int(ram.get("dirty-sync-count", 0)),
                "guest_answers_at_destination": alive,
            }
        finally:
            for p in procs:
                p.kill()
                p.wait()


def qemu_accel(qemu: str) -> str | None:
    """'kvm' if QEMU boots the guest with KVM here, else 'tcg' if it does with TCG."""
    from pyhv.guest_image import image_path

    for accel in ("kvm", "tcg"):
        with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as d:
            p = subprocess.Popen(
                qemu_cmd(qemu, image_path(), "128M", accel, d, "probe"), stderr=subprocess.PIPE
            )
            try:
                Serial(f"{d}/probe-serial.sock").until(b"pyhv> ", 30)
                return accel
            except (OSError, RuntimeError, TimeoutError):
                continue
            finally:
                p.kill()
                p.wait()
    return None


# --- main ---------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="256 MiB only, idle and 16 MiB")
    ap.add_argument("--no-qemu", action="store_true")
    args = ap.parse_args()
    sizes = ["256M"] if args.quick else ["256M", "1G"]
    workloads = [0, 16] if args.quick else [0, 16, 64, 256]
    bw = loopback_bandwidth()
    print(f"loopback TCP: {bw / 1e6:.0f} MB/s (measured on PVM)")
    qemu = None if args.no_qemu else shutil.which("qemu-system-x86_64")
    accel = qemu_accel(qemu) if qemu else None
    if qemu and accel is None:
        print("QEMU could not boot the guest with KVM or TCG: skipped")
    elif qemu:
        print(
            f"QEMU: {accel}"
            + (" (QEMU's KVM failed under this nested KVM)" if accel == "tcg" else "")
        )
    rows: list[dict[str, Any]] = []
    for memory in sizes:
        mib = int(memory[:-1]) * (1024 if memory.endswith("G") else 1)
        for dirty in workloads:
            row: dict[str, Any] = {"memory": memory, "dirty_mib": dirty}
            if dirty >= mib:
                row["skipped"] = "the working set does not fit in the guest"
                rows.append(row)
                continue
            p = run_pyhv(memory, dirty)
            p["physical_limit_s"] = round(p["bytes_sent"] / bw, 4)
            p["total_over_limit"] = round(p["total_s"] / max(p["physical_limit_s"], 1e-9), 2)
            row["pyhv"] = p
            if qemu and accel:
                try:
                    q = run_qemu(qemu, accel, memory, dirty)
                except Exception as e:  # noqa: BLE001 - reported in the table
                    q = {"error": f"{type(e).__name__}: {e}"}
                if "bytes_sent" in q:
                    q["physical_limit_s"] = round(q["bytes_sent"] / bw, 4)
                row["qemu"] = q
                if "downtime_ms" in q and q["downtime_ms"]:
                    row["downtime_pyhv_over_qemu"] = round(p["downtime_ms"] / q["downtime_ms"], 2)
            rows.append(row)
            q = row.get("qemu", {})
            print(
                f"{memory:>5} dirty {dirty:>3} MiB | pyhv total {p['total_s']:.3f} s, downtime "
                f"{p['downtime_ms']:.1f} ms, {p['bytes_sent'] / 2**20:.1f} MiB, {p['passes']} passes, "
                f"limit {p['physical_limit_s']:.3f} s (x{p['total_over_limit']})"
                + (
                    f" | qemu total {q['total_s']:.3f} s, downtime {q['downtime_ms']:.0f} ms, "
                    f"{q['bytes_sent'] / 2**20:.1f} MiB, {q['passes']} passes"
                    if "total_s" in q
                    else (f" | qemu {q.get('error')}" if q else "")
                ),
                flush=True,
            )
    print(
        json.dumps(
            {
                "bench": "migration",
                "measured_on": "PVM",
                "loopback_bytes_per_s": round(bw),
                "qemu_accel": accel,
                "downtime_limit_ms": DOWNTIME_MS,
                "rows": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
