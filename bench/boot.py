"""Boot latency of `pyhv run`, side by side with QEMU microvm booting the same image.

From process start to the guest's first serial byte and to the shell prompt, median and min-max
of 7 runs each (3 with PYHV_BENCH_QUICK=1, taking turns), plus the floors that explain pyhv's figure (the Python interpreter's start and the
import of the hypervisor layer). QEMU (when installed) boots the same ELF through its PVH note:
`qemu-system-x86_64 -M microvm -kernel pyhv-guest.elf`, with KVM only (if QEMU cannot start with
KVM, its row holds the error). Measured on PVM (this machine's KVM
emulates guest kernel code), so guest-side time is slower than on VT-x/AMD-V hardware.
Writes bench/results/boot.json and ends stdout with the same JSON object.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = b"pyhv> "
ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60.0

sys.path.insert(0, str(ROOT))

from bench import common  # noqa: E402

RUNS = common.pick(7, 3)


def timed_boot(cmd: list[str], stdin_data: bytes | None = None) -> tuple[float, float]:
    """Seconds from spawning ``cmd`` to its first stdout byte and to the shell prompt."""
    errors = tempfile.TemporaryFile()  # what the process says when it fails (e.g. QEMU's KVM)

    def why() -> str:
        errors.seek(0)
        return errors.read().decode(errors="replace").strip()[-300:]

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stdin is not None
    fd = proc.stdout.fileno()
    first = prompt = None
    seen = b""
    try:
        while prompt is None:
            left = t0 + TIMEOUT - time.perf_counter()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(
                    f"no prompt from {cmd[0]} within {TIMEOUT} s: {seen[-200:]!r} {why()}"
                )
            chunk = os.read(fd, 65536)
            now = time.perf_counter()
            if not chunk:
                proc.wait()
                raise RuntimeError(
                    f"{Path(cmd[0]).name} exited before its prompt: {why() or repr(seen[-200:])}"
                )
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
        errors.close()
    assert first is not None
    return first, prompt


def timed_exit(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def ms_spread(samples: list[float]) -> dict[str, Any]:
    return common.spread([x * 1000 for x in samples], 1)


def pyhv_command() -> list[str]:
    script = Path(sys.executable).parent / "pyhv"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "pyhv.cli"]
    return [*base, "run", "--memory", "512M", "--command", "poweroff"]


def qemu_command(image: Path) -> list[str] | None:
    qemu = common.qemu_binary()
    if qemu is None:
        return None
    return [
        qemu,
        "-M",
        "microvm,rtc=off,pic=off,pit=off",
        *common.QEMU_KVM,
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
    firsts = [f * 1000 for f, _ in samples]
    prompts = [p * 1000 for _, p in samples]
    return {
        "first_byte_ms": common.spread(firsts, 1),
        "prompt_ms": common.spread(prompts, 1),
        "first_byte_samples_ms": [round(x, 1) for x in firsts],
        "prompt_samples_ms": [round(x, 1) for x in prompts],
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
                errors[name] = str(e)  # QEMU's row then says why (e.g. its KVM start failed)
    return {
        name: ({"error": errors[name]} if name in errors else summary(samples[name]))
        for name in commands
    }


def main() -> int:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("bench/boot.py needs /dev/kvm (load kvm_intel, kvm_amd or kvm_pvm)", file=sys.stderr)
        return 1
    run = common.run_info()
    from pyhv.guest_image import image_path

    image = image_path()  # built before timing
    from pyhv.kvm import fastrun

    fastrun.load()  # the C run loop too (built once per source and Python, then cached)
    py = sys.executable
    floors = {
        "python_start_ms": ms_spread([timed_exit([py, "-c", "pass"]) for _ in range(RUNS)]),
        "import_hypervisor_ms": ms_spread(
            [timed_exit([py, "-c", "import pyhv.hypervisor"]) for _ in range(RUNS)]
        ),
        "import_boot_path_ms": ms_spread(
            [
                timed_exit(
                    [py, "-c", "import pyhv.cli, pyhv.worker.vm, pyhv.guest_image, pyhv.hypervisor"]
                )
                for _ in range(RUNS)
            ]
        ),
    }
    result: dict[str, Any] = {
        "runs": RUNS,
        "image": str(image.relative_to(ROOT)) if image.is_relative_to(ROOT) else str(image),
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
    if qemu is None:
        result["qemu_microvm"] = {"error": "qemu-system-x86_64 is not installed"}

    p = result["pyhv_run"]
    q = result["qemu_microvm"]
    print(f"boot latency, measured on PVM (median of {RUNS}, ms)")
    for name, r in (("pyhv run", p), ("qemu -M microvm", q)):
        if "error" in r:
            print(f"  {name:17s} {r['error']}")
        else:
            print(
                f"  {name:17s} first byte {r['first_byte_ms']['median']:7.1f}   "
                f"prompt {r['prompt_ms']['median']:7.1f}"
            )
    if "error" not in p and "error" not in q:
        result["first_byte_ratio_pyhv_over_qemu"] = round(
            p["first_byte_ms"]["median"] / q["first_byte_ms"]["median"], 2
        )
    else:
        result["first_byte_ratio_pyhv_over_qemu"] = None
    print(
        f"  floors: python start {floors['python_start_ms']['median']}, + import pyhv.hypervisor "
        f"{floors['import_hypervisor_ms']['median']}, + whole boot path imports "
        f"{floors['import_boot_path_ms']['median']}"
    )
    common.finish("boot", result, run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
