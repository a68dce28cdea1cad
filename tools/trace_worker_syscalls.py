"""Trace the system calls a worker really makes (for the seccomp allow-list in
pyhv/worker/confine.py): boot the bundled guest in a worker under `strace -f`, use its shell
and Dynamic Memory (add, balloon, unballoon), stop it, and print the sorted set of calls.

    python tools/trace_worker_syscalls.py   (needs strace: apt-get install strace)
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> int:
    if shutil.which("strace") is None:
        print("strace is missing: apt-get install strace", file=sys.stderr)
        return 2
    from pyhv.guest_image import image_path
    from pyhv.worker.config import VmConfig
    from pyhv.worker.process import WorkerProcess

    out = Path(tempfile.mkdtemp()) / "trace"
    seen = threading.Event()
    buf = bytearray()

    def output(data: bytes) -> None:
        buf.extend(data)
        if buf.count(b"> ") >= 3:
            seen.set()

    config = VmConfig.create(
        image=str(image_path()),
        memory=256 << 20,
        dynamic_memory=True,
        minimum=128 << 20,
        maximum=512 << 20,
    )
    reported = threading.Event()
    w = WorkerProcess(
        config, output=output, on_memory_status=lambda st: st.reported and reported.set()
    )
    w.command_prefix = ["strace", "-f", "-qq", "-o", str(out)]
    w.start()
    w.send(b"mem\rticks\r")
    seen.wait(120)
    reported.wait(120)
    for target in (384 << 20, 192 << 20, 256 << 20):
        try:
            w.set_memory_target(target)
            for _ in range(300):  # until the operation is done (busy clears)
                time.sleep(0.1)
                st = w.last_memory_status
                if st is not None and not st.busy:
                    break
        except RuntimeError as e:
            print("target", target, e, file=sys.stderr)
    w.send(b"mem\r")
    w.stop()
    w.wait(60)
    w.close()
    calls: set[str] = set()
    for f in out.parent.iterdir():
        for line in f.read_text(errors="replace").splitlines():
            m = re.match(r"\d+\s+(?:<\.\.\. )?([a-z_0-9]+)[( ]", line)
            if m and m[1] not in ("exited", "killed"):
                calls.add(m[1])
    print(" ".join(sorted(calls)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
