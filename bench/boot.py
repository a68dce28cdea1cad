"""Boot latency of `pyhv run`, side by side with QEMU microvm booting the same image.

From process start to the guest's first serial byte and to the shell prompt, median of 5
runs each (taking turns), plus the floors that explain pyhv's figure (the Python interpreter's start and the
import of the hypervisor layer). QEMU (when installed) boots the same ELF through its PVH note:
`qemu-system-x86_64 -M microvm -kernel pyhv-guest.elf`. Measured on PVM (this machine's KVM
emulates guest kernel code), so guest-side time is slower than on VT-x/AMD-V hardware.
The last stdout line is one JSON object.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

RUNS = 5
PROMPT = b"pyhv> "
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0


def timed_boot(cmd: list[str], stdin_data: bytes | None = None) -> tuple[float, float]:
    """Seconds from spawning ``cmd`` to its first stdout byte and to the shell prompt."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert proc.stdout is not None and proc.stdin is not None
    fd = proc.stdout.fileno()
    first = prompt = None
    seen = b""
    try:
        while prompt is None:
            left = t0 + TIMEOUT - time.perf_counter()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no prompt from {cmd[0]} within {TIMEOUT} s: {seen[-200:]!r}")
            chunk = os.read(fd, 65536)
            now = time.perf_counter()
            if not chunk:
                raise RuntimeError(f"{cmd[0]} exited before its prompt: {seen[-200:]!r}")
            if first is None:
                first = now - t0
            seen += chunk
            if PROMPT in seen:
                prompt = now - t0
        if stdin_data:
            try:
                proc.stdin.write(stdin_data)
                proc.stdin.flush()
            except BrokenPipeError:
                pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert first is not None
    return first, prompt


def timed_exit(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


def pyhv_command() -> list[str]:
    script = Path(sys.executable).parent / "pyhv"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "pyhv.cli"]
    return [*base, "run", "--memory", "512M", "--command", "poweroff"]


def qemu_command(image: Path) -> list[str] | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return None
    return [
        qemu,
        "-M",
        "microvm,rtc=off,pic=off,pit=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "512M",
        "-smp",
        "1",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel",
        str(image),
    ]


def summary(samples: list[tuple[float, float]]) -> dict[str, object]:
    firsts = [f for f, _ in samples]
    prompts = [p for _, p in samples]
    return {
        "first_byte_ms": median_ms(firsts),
        "prompt_ms": median_ms(prompts),
        "first_byte_samples_ms": [round(x * 1000, 1) for x in firsts],
        "prompt_samples_ms": [round(x * 1000, 1) for x in prompts],
    }


def interleaved(commands: dict[str, tuple[list[str], bytes | None]]) -> dict[str, object]:
    """RUNS boots of each command, taking turns, so load from other work on this shared
    machine falls on both alike."""
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    errors: dict[str, str] = {}
    for _ in range(RUNS):
        for name, (cmd, stdin_data) in commands.items():
            if name in errors:
                continue
            try:
                samples[name].append(timed_boot(cmd, stdin_data))
            except (RuntimeError, TimeoutError) as e:
                errors[name] = str(e)
    return {
        name: ({"error": errors[name]} if name in errors else summary(samples[name]))
        for name in commands
    }


def main() -> int:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench/boot.py needs /dev/kvm", file=sys.stderr)
        print(json.dumps({"bench": "boot", "skipped": "no /dev/kvm"}))
        return 0
    sys.path.insert(0, str(ROOT))
    from pyhv.guest_image import image_path

    image = image_path()  # built before timing
    from pyhv.kvm import fastrun

    fastrun.load()  # the C run loop too (built once per source and Python, then cached)
    py = sys.executable
    floors = {
        "python_start_ms": median_ms([timed_exit([py, "-c", "pass"]) for _ in range(RUNS)]),
        "import_hypervisor_ms": median_ms(
            [timed_exit([py, "-c", "import pyhv.hypervisor"]) for _ in range(RUNS)]
        ),
        "import_boot_path_ms": median_ms(
            [
                timed_exit(
                    [py, "-c", "import pyhv.cli, pyhv.worker.vm, pyhv.guest_image, pyhv.hypervisor"]
                )
                for _ in range(RUNS)
            ]
        ),
    }
    result: dict[str, object] = {
        "bench": "boot",
        "label": "measured on PVM",
        "runs": RUNS,
        "image": str(image),
        "floors": floors,
        "run_loop": "c" if fastrun.load() is not None else "python",
        # with PYTHONDONTWRITEBYTECODE set and no __pycache__, every process compiles pyhv's
        # modules from source: much of the import floors then
        "bytecode_written": not sys.flags.dont_write_bytecode,
    }
    commands: dict[str, tuple[list[str], bytes | None]] = {"pyhv_run": (pyhv_command(), None)}
    qemu = qemu_command(image)
    if qemu is not None:
        commands["qemu_microvm"] = (qemu, b"poweroff\r")
    result.update(interleaved(commands))
    result.setdefault("qemu_microvm", None)

    p = result["pyhv_run"]
    q = result["qemu_microvm"]
    print(f"boot latency, measured on PVM (median of {RUNS}, ms)")
    print(
        f"  pyhv run          first byte {p['first_byte_ms']:7.1f}   prompt {p['prompt_ms']:7.1f}"
    )  # type: ignore[index]
    if isinstance(q, dict) and "first_byte_ms" in q:
        print(
            f"  qemu -M microvm   first byte {q['first_byte_ms']:7.1f}   prompt {q['prompt_ms']:7.1f}"
        )
        result["first_byte_ratio_pyhv_over_qemu"] = round(
            p["first_byte_ms"] / q["first_byte_ms"],  # type: ignore[index,operator]
            2,
        )
    else:
        print(f"  qemu -M microvm   {q.get('error') if isinstance(q, dict) else 'not installed'}")
    print(
        f"  floors: python start {floors['python_start_ms']}, + import pyhv.hypervisor "
        f"{floors['import_hypervisor_ms']}, + whole boot path imports {floors['import_boot_path_ms']}"
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
