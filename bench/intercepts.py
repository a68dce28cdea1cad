"""Intercept delivery rate: pyhv's full intercept API against a minimal C KVM_RUN loop.

pyhv runs its VPs on its C run loop (pyhv/kvm/_runloop.c) where that builds, else on the same
loop in Python; `pyhv_loop` in the JSON says which.

One guest, three loops at CPL0: N port writes (OUT 0x80), N MMIO writes (GPA 0xd0000000, no RAM)
and N RDMSRs (0x40000000, sent to user space by the MSR filter). Each runs under
  - pyhv: Partition + intercepts.install_io / install_gpa / install_msr with trivial handlers,
  - C: the same guest under a minimal KVM_RUN loop built here with gcc,
  - QEMU (microvm, booted by PVH into the same loops), only if qemu-system-x86_64 exists: port
    0x80 and GPA 0xd0000000 are unassigned there, so each exit is QEMU's own dispatch. QEMU's rate
    is N / (time with N exits - time with 0 exits), startup cancelled out. No MSR loop: KVM
    answers unknown MSRs itself unless user-space MSR exits are enabled, which QEMU does not do.
    QEMU runs with KVM only (bench/common.py's QEMU_KVM); if it cannot, the JSON says why.
pyhv runs each loop again with the flight recorder on (pyhv.trace: every exit an event, as
while `pyhv vm trace` watches); with it off, nothing on the exit path knows it exists.
The port, MMIO and MSR loops also run on pyhv's pure-Python run loop, in a process with
PYHV_NO_FASTRUN=1. Everything is repeated, interleaved, and reported as the median
with min-max (the machine is shared and noisy); ratios and the ns per exit pyhv adds to the C
loop are taken per repetition. Writes bench/results/intercepts.json (bench/common.py) and ends
stdout with the same JSON object. Figures are measured on PVM (kvm_pvm): guest code at CPL0
is emulated there, so the kernel's exit path dominates.

usage: python bench/intercepts.py [N] [REPEATS]   (default 50 000 x 5; PYHV_BENCH_QUICK=1: 20 000 x 3)
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common  # noqa: E402
from bench.common import QEMU_KVM  # noqa: E402
from pyhv.hypervisor import Partition, enter_long_mode  # noqa: E402
from pyhv.kvm import fastrun  # noqa: E402

BASE = 0x200000
STACK = 0x1FF000
MMIO_GPA = 0xD0000000
MSR = 0x40000000
DONE_PORT = 0xF4
QEMU_DONE = 0x21  # the guest's isa-debug-exit value: QEMU then exits with (0x21 << 1) | 1
QEMU_FACTOR = 2  # QEMU runs this many times N exits, so its start-up is small beside them

GUEST = f"""
.code64
.globl _start
_start:
.globl io_loop
io_loop:
1:  outb %al, $0x80
    dec %rcx
    jnz 1b
    outb %al, ${DONE_PORT:#x}
2:  jmp 2b
.globl mmio_loop
mmio_loop:
    mov ${MMIO_GPA:#x}, %rbx
1:  movl %eax, (%rbx)
    dec %rcx
    jnz 1b
    outb %al, ${DONE_PORT:#x}
2:  jmp 2b
.globl msr_loop
msr_loop:
    mov %rcx, %r8
1:  mov ${MSR:#x}, %ecx
    rdmsr
    dec %r8
    jnz 1b
    outb %al, ${DONE_PORT:#x}
2:  jmp 2b
"""

C_LOOP = r"""
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
#define CHECK(x) do { if ((x) < 0) { perror(#x); exit(1); } } while (0)
int main(int argc, char **argv) {
    uint64_t entry = strtoull(argv[2], 0, 0), n = strtoull(argv[3], 0, 0);
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC), vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK(ioctl(vm, KVM_CREATE_IRQCHIP, 0));
    struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR, .args = { 7 } };
    CHECK(ioctl(vm, KVM_ENABLE_CAP, &cap));
    uint8_t deny = 0;
    struct kvm_msr_filter f = { .flags = KVM_MSR_FILTER_DEFAULT_ALLOW,
        .ranges = { { .flags = KVM_MSR_FILTER_READ, .nmsrs = 1, .base = 0x40000000, .bitmap = &deny } } };
    CHECK(ioctl(vm, KVM_X86_SET_MSR_FILTER, &f));
    size_t memsz = 16 << 20;
    uint8_t *mem = mmap(0, memsz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    struct kvm_userspace_memory_region r = { .slot = 0, .memory_size = memsz, .userspace_addr = (uint64_t)mem };
    CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r));
    FILE *fp = fopen(argv[1], "rb"); size_t got = fread(mem + 0x200000, 1, 1 << 20, fp); fclose(fp); (void)got;
    uint64_t *pml4 = (uint64_t *)(mem + 0x10000), *pdpt = (uint64_t *)(mem + 0x11000);
    pml4[0] = 0x11000 | 7;
    for (int j = 0; j < 4; j++) {
        pdpt[j] = (0x12000 + 0x1000 * j) | 7;
        uint64_t *pd = (uint64_t *)(mem + 0x12000 + 0x1000 * j);
        for (int i = 0; i < 512; i++) pd[i] = ((uint64_t)j << 30) | ((uint64_t)i << 21) | 0x87;
    }
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    struct { struct kvm_cpuid2 c; struct kvm_cpuid_entry2 e[256]; } cpuid = { .c.nent = 256 };
    CHECK(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, &cpuid));
    CHECK(ioctl(vcpu, KVM_SET_CPUID2, &cpuid));
    int runsz = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    struct kvm_run *run = mmap(0, runsz, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    struct kvm_sregs s; CHECK(ioctl(vcpu, KVM_GET_SREGS, &s));
    s.cr3 = 0x10000; s.cr4 = 0x620; s.cr0 = 0x80010033; s.efer = 0x501;
    struct kvm_segment cs = { .limit = 0xffffffff, .selector = 0x10, .type = 11, .present = 1, .s = 1, .l = 1, .g = 1 };
    struct kvm_segment ds = { .limit = 0xffffffff, .selector = 0x18, .type = 3, .present = 1, .db = 1, .s = 1, .g = 1 };
    s.cs = cs; s.ds = s.es = s.fs = s.gs = s.ss = ds;
    CHECK(ioctl(vcpu, KVM_SET_SREGS, &s));
    struct kvm_regs g; memset(&g, 0, sizeof g);
    g.rip = entry; g.rsp = 0x1ff000; g.rflags = 2; g.rcx = n;
    CHECK(ioctl(vcpu, KVM_SET_REGS, &g));
    uint64_t exits = 0; double t0 = now();
    for (;;) {
        CHECK(ioctl(vcpu, KVM_RUN, 0));
        if (run->exit_reason == KVM_EXIT_IO) {
            if (run->io.port == 0x80) { exits++; continue; }
            if (run->io.port == 0xf4) break;
        } else if (run->exit_reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write) memset(run->mmio.data, 0xff, 8);
            exits++; continue;
        } else if (run->exit_reason == KVM_EXIT_X86_RDMSR) {
            run->msr.data = 1; run->msr.error = 0; exits++; continue;
        }
        fprintf(stderr, "unexpected exit %d\n", run->exit_reason); return 1;
    }
    printf("%llu %.6f\n", (unsigned long long)exits, now() - t0);
    return 0;
}
"""


QEMU_GUEST = r"""
.section .note.pvh, "a"
.align 4
.long 4
.long 4
.long 18
.asciz "Xen"
.align 4
.long pvh_entry

.text
.code32
.globl pvh_entry
pvh_entry:
    cld
    mov $0x10000, %edi
    xor %eax, %eax
    mov $(0x6000 / 4), %ecx
    rep stosl
    movl $0x11003, 0x10000
    movl $0x12003, 0x11000
    movl $0x13003, 0x11008
    movl $0x14003, 0x11010
    movl $0x15003, 0x11018
    mov $0x12000, %edi
    xor %ecx, %ecx
1:  mov %ecx, %eax
    shl $21, %eax
    or $0x83, %eax
    mov %eax, (%edi,%ecx,8)
    inc %ecx
    cmp $2048, %ecx
    jne 1b
    mov %cr4, %eax
    or $0x20, %eax
    mov %eax, %cr4
    mov $0x10000, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    or $0x80000001, %eax
    mov %eax, %cr0
    lgdt gdt_desc
    ljmp $0x10, $long_entry
.code64
long_entry:
    mov $0x18, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov $0x1ff000, %rsp
    mov $COUNT, %rcx
    jmp LOOP

.globl io_loop
io_loop:
    test %rcx, %rcx
    jz 3f
1:  outb %al, $0x80
    dec %rcx
    jnz 1b
3:  mov $QEMU_DONE, %al
    outb %al, $0xf4
2:  jmp 2b
.globl mmio_loop
mmio_loop:
    test %rcx, %rcx
    jz 3f
    mov $0xd0000000, %rbx
1:  movl %eax, (%rbx)
    dec %rcx
    jnz 1b
3:  mov $QEMU_DONE, %al
    outb %al, $0xf4
2:  jmp 2b

.data
.align 16
gdt:
    .quad 0, 0
    .quad 0x00AF9B000000FFFF
    .quad 0x00CF93000000FFFF
gdt_desc:
    .word 31
    .long gdt
"""

QEMU_ARGS = [
    *QEMU_KVM, "-M", "microvm,x-option-roms=off,rtc=off", "-m", "64M",
    "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none", "-monitor", "none",
    "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=1",
]  # fmt: skip


def build_qemu_guest(tmp: Path, loop: str, count: int) -> Path:
    """A PVH-bootable ELF: 32-bit entry builds page tables, enters long mode, runs `loop`."""
    name = f"q-{loop}-{count}"
    (tmp / "q.S").write_text(QEMU_GUEST)
    (tmp / "q.ld").write_text(
        "ENTRY(pvh_entry)\nSECTIONS { . = 0x200000; .note.pvh : { *(.note.pvh) } "
        ".text : { *(.text*) } .data : { *(.data*) } }\n"
    )
    obj, elf = tmp / f"{name}.o", tmp / f"{name}.elf"
    subprocess.run(
        [
            "gcc",
            "-c",
            f"-DCOUNT={count}",
            f"-DLOOP={loop}",
            f"-DQEMU_DONE={QEMU_DONE}",
            str(tmp / "q.S"),
            "-o",
            str(obj),
        ],
        check=True,
    )
    subprocess.run(
        ["ld", "-nostdlib", "-static", "--no-warn-rwx-segments", "-T", str(tmp / "q.ld"),
         "-o", str(elf), str(obj)],
        check=True,
    )  # fmt: skip
    return elf


def qemu_seconds(qemu: str, elf: Path) -> float:
    """Wall time of one QEMU (with KVM) running `elf` to its isa-debug-exit."""
    t0 = time.perf_counter()
    r = subprocess.run([qemu, *QEMU_ARGS, "-kernel", str(elf)], capture_output=True, timeout=300)
    dt = time.perf_counter() - t0
    if r.returncode != QEMU_DONE << 1 | 1:  # isa-debug-exit's status; QEMU's own errors are 1
        raise RuntimeError(
            f"QEMU with KVM exited with {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]}"
        )
    return dt


def build(tmp: Path) -> tuple[bytes, dict[str, int], Path]:
    (tmp / "g.S").write_text(GUEST)
    (tmp / "g.ld").write_text(
        f"ENTRY(_start)\nSECTIONS {{ . = {BASE:#x}; .text : {{ *(.text*) }} }}\n"
    )
    subprocess.run(["gcc", "-c", str(tmp / "g.S"), "-o", str(tmp / "g.o")], check=True)
    subprocess.run(
        [
            "ld",
            "-nostdlib",
            "-static",
            "-T",
            str(tmp / "g.ld"),
            "-o",
            str(tmp / "g.elf"),
            str(tmp / "g.o"),
        ],
        check=True,
    )
    subprocess.run(["objcopy", "-O", "binary", str(tmp / "g.elf"), str(tmp / "g.bin")], check=True)
    syms = {}
    for line in subprocess.run(
        ["nm", str(tmp / "g.elf")], capture_output=True, text=True
    ).stdout.splitlines():
        a, _, name = line.split()
        syms[name] = int(a, 16)
    (tmp / "loop.c").write_text(C_LOOP)
    subprocess.run(["gcc", "-O2", "-o", str(tmp / "loop"), str(tmp / "loop.c")], check=True)
    return (tmp / "g.bin").read_bytes(), syms, tmp / "loop"


def run_pyhv(
    code: bytes, entry: int, n: int, time_handlers: bool = True, traced: bool = False
) -> float:
    """pyhv's rate on the loop this process runs VPs on (C unless PYHV_NO_FASTRUN=1). With
    `traced`, the flight recorder is on as while `pyhv vm trace` watches: every exit becomes an
    event in the VM's ring and in a bounded stream that a thread drains (as the worker's)."""
    from pyhv.trace.recorder import BoundedStream, Recorder

    with Partition("bench", time_handlers=time_handlers) as p:
        recorder = Recorder(
            on_active=lambda on: p.intercepts.set_tracer(recorder.record if on else None)
        )
        stream = BoundedStream(8192)
        if traced:
            recorder.subscribe(stream.put)
            threading.Thread(target=lambda: _drain(stream), daemon=True).start()
        p.add_memory(0, 16 << 20)
        p.write(BASE, code)
        vp = p.create_vp(0)
        enter_long_mode(p, vp, entry, STACK, rcx=n)
        done = threading.Event()
        end = [0.0]

        def finish(m: object) -> None:
            end[0] = time.perf_counter()
            done.set()
            vp.pause()

        p.intercepts.install_io(0x80, 0x80, lambda m: None)  # trivial handlers
        p.intercepts.install_gpa(MMIO_GPA, 0x1000, lambda m: 0)
        p.intercepts.install_msr(MSR, lambda m: 1)
        p.intercepts.install_io(DONE_PORT, DONE_PORT, finish)
        t0 = time.perf_counter()
        vp.start()
        if not done.wait(120):
            raise RuntimeError(f"guest did not finish: {vp.wait(0)}")
        c = p.counters
        handled = c["io_port"]["count"] - 1 + c["memory"]["count"] + c["msr"]["count"]
        if handled != n:
            raise RuntimeError(f"expected {n} intercepts, counted {handled}")
        stream.close()
        if recorder.recorded != (n + 1 if traced else 0):  # and the DONE_PORT write
            raise RuntimeError(f"{recorder.recorded} events recorded for {n} intercepts")
        want = "python" if fastrun.disabled() else "c"
        if vp.loop_kind != want:
            raise RuntimeError(f"the VP ran the {vp.loop_kind} loop, not the {want} loop")
        return n / (end[0] - t0)


def _drain(stream: Any) -> None:
    """As the worker's trace stream reads (pyhv.worker.trace), without the socket."""
    from pyhv.trace.recorder import LINGER

    while (events := stream.take()) is not None:
        if len(events) < 2048:
            time.sleep(LINGER)


def run_pyhv_python_loop(binary: Path, entry: int, n: int) -> float:
    """pyhv's rate on its pure-Python run loop: this script in a process with
    PYHV_NO_FASTRUN=1 (as a user without a C compiler would run it)."""
    env = {**os.environ, fastrun.DISABLE_ENV: "1"}
    out = subprocess.run(
        [sys.executable, __file__, "--one", str(binary), hex(entry), str(n)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    if out.returncode != 0:
        raise RuntimeError(f"the Python-loop run failed: {out.stderr[-500:]}")
    return float(out.stdout.split()[-1])


def run_python_floor(code: bytes, entry: int, n: int) -> float:
    """The least any Python loop can do per exit: KVM_RUN and read the port (no API)."""
    import fcntl

    from pyhv.kvm import constants as c

    with Partition("floor") as p:
        p.add_memory(0, 16 << 20)
        p.write(BASE, code)
        vp = p.create_vp(0)
        enter_long_mode(p, vp, entry, STACK, rcx=n)
        fd, h, ioctl, kvm_run = vp.vcpu.fd, vp.vcpu.run_page.h, fcntl.ioctl, c.KVM_RUN
        count = 0
        t0 = time.perf_counter()
        while True:
            ioctl(fd, kvm_run, 0)
            if h[17] != 0x80:
                break
            count += 1
        dt = time.perf_counter() - t0
        if count != n:
            raise RuntimeError(f"floor loop counted {count} exits, expected {n}")
        return n / dt


def run_c(loop: Path, binary: Path, entry: int, n: int) -> float:
    out = subprocess.run(
        [str(loop), str(binary), hex(entry), str(n)], capture_output=True, text=True, check=True
    )
    exits, seconds = out.stdout.split()
    if int(exits) != n:
        raise RuntimeError(f"C loop counted {exits} exits, expected {n}")
    return n / float(seconds)


def _add(samples: dict[str, list[float]], key: str, value: float) -> None:
    samples.setdefault(key, []).append(value)


def measure(
    tmp: Path, n: int, repeats: int, qemu: str | None
) -> tuple[dict[str, list[float]], str | None]:
    """All loops, `repeats` times, interleaved so every loop sees the same machine load; per
    repetition also the ratios and the ns each exit costs pyhv beyond the C loop. Returns the
    samples and, if QEMU with KVM could not run, why."""
    code, syms, loop = build(tmp)
    binary = tmp / "g.bin"
    s: dict[str, list[float]] = {}
    qemu_elves: dict[str, tuple[Path, Path]] = {}
    qemu_error = None if qemu else "qemu-system-x86_64 is not installed"
    if qemu is not None:
        for kind in ("io", "mmio"):
            qemu_elves[kind] = (
                build_qemu_guest(tmp, f"{kind}_loop", 0),
                build_qemu_guest(tmp, f"{kind}_loop", QEMU_FACTOR * n),
            )
        try:
            qemu_seconds(qemu, qemu_elves["io"][0])
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:
            qemu_error, qemu_elves = str(e), {}
    for rep in range(repeats):
        for kind in ("io", "mmio", "msr"):
            entry = syms[f"{kind}_loop"]
            c = run_c(loop, binary, entry, n)
            py = run_pyhv(code, entry, n)
            traced = run_pyhv(code, entry, n, traced=True)
            pyloop = run_pyhv_python_loop(binary, entry, n)
            _add(s, f"{kind}_c_per_s", c)
            _add(s, f"{kind}_pyhv_per_s", py)
            _add(s, f"{kind}_pyhv_python_loop_per_s", pyloop)
            _add(s, f"{kind}_ratio_vs_c", py / c)
            _add(s, f"{kind}_pyhv_tracing_on_per_s", traced)
            _add(s, f"{kind}_ratio_vs_c_tracing_on", traced / c)
            _add(s, f"{kind}_python_loop_ratio_vs_c", pyloop / c)
            _add(s, f"{kind}_ns_per_exit_over_c", 1e9 / py - 1e9 / c)
            if kind == "io":
                floor = run_python_floor(code, entry, n)
                untimed = run_pyhv(code, entry, n, time_handlers=False)
                _add(s, "io_python_floor_per_s", floor)
                _add(s, "io_ratio_vs_python_floor", py / floor)
                _add(s, "io_pyhv_untimed_per_s", untimed)
                _add(s, "io_untimed_ratio_vs_c", untimed / c)
            if kind in qemu_elves:
                zero, full = qemu_elves[kind]
                # startup cancelled out: N exits' time minus the same QEMU with 0 exits
                rate = QEMU_FACTOR * n / (qemu_seconds(qemu, full) - qemu_seconds(qemu, zero))  # type: ignore[arg-type]
                _add(s, f"{kind}_qemu_per_s", rate)
                _add(s, f"{kind}_ratio_vs_qemu", py / rate)
        print(
            f"repetition {rep + 1}/{repeats}: "
            + ", ".join(
                f"{k} {s[k][-1]:.3f}" for k in s if "ratio" in k and not k.startswith("io_untimed")
            ),
            flush=True,
        )
    return s, qemu_error


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--one":  # a child measuring one loop (see above)
        binary, entry, n = Path(sys.argv[2]), int(sys.argv[3], 0), int(sys.argv[4])
        print(run_pyhv(binary.read_bytes(), entry, n))
        return
    run = common.run_info()
    n = int(sys.argv[1]) if len(sys.argv) > 1 else common.pick(50_000, 20_000)
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else common.pick(5, 3)
    result: dict[str, Any] = {"n": n, "repeats": repeats, "qemu_exits": QEMU_FACTOR * n}
    result["pyhv_loop"] = "c" if fastrun.load() is not None else "python"
    if fastrun.why_unavailable():
        result["pyhv_loop_why_python"] = fastrun.why_unavailable()
    qemu = common.qemu_binary()
    with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as d:
        samples, qemu_error = measure(Path(d), n, repeats, qemu)
    # with KVM or not at all: the error is what the doc's QEMU column shows
    result["qemu"] = {"error": qemu_error} if qemu_error else {"args": QEMU_ARGS}
    figures = {k: common.spread(v, 3 if "ratio" in k else 0) for k, v in samples.items()}
    result["figures"] = figures
    # The keys issue 10 asks for: medians of the per-repetition ratios
    result["io_ratio_vs_c"] = figures["io_ratio_vs_c"]["median"]
    result["io_ratio_vs_qemu"] = figures.get("io_ratio_vs_qemu", {}).get("median")
    result["io_ratio_vs_c_tracing_on"] = figures["io_ratio_vs_c_tracing_on"]["median"]
    for k, f in figures.items():
        print(f"{k:34s} median {f['median']:>12,}  min {f['min']:>12,}  max {f['max']:>12,}")
    common.finish("intercepts", result, run)


if __name__ == "__main__":
    main()
