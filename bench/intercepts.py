"""Intercept delivery rate: pyhv's full intercept API against a minimal C KVM_RUN loop.

pyhv runs its VPs on its C run loop (pyhv/kvm/_runloop.c) where that builds, else on the same
loop in Python; `pyhv_loop` in the JSON says which, and the port loop is also measured on the
Python loop (`io_pyhv_python_loop_per_s`).

One guest, three loops at CPL0: N port writes (OUT 0x80), N MMIO writes (GPA 0xd0000000, no RAM)
and N RDMSRs (0x40000000, sent to user space by the MSR filter). Each runs under
  - pyhv: Partition + intercepts.install_io / install_gpa / install_msr with trivial handlers,
  - C: the same guest under a minimal KVM_RUN loop built here with gcc,
  - QEMU (microvm, booted by PVH into the same loops), only if qemu-system-x86_64 exists: port
    0x80 and GPA 0xd0000000 are unassigned there, so each exit is QEMU's own dispatch. QEMU's rate
    is N / (time with N exits - time with 0 exits), startup cancelled out. No MSR loop: KVM
    answers unknown MSRs itself unless user-space MSR exits are enabled, which QEMU does not do.
Each measurement is repeated and the best rate kept (the machine is shared and noisy).
The last stdout line is one JSON object. Figures are measured on PVM (kvm_pvm): guest code at CPL0
is emulated there, so the kernel's exit path dominates.

usage: python bench/intercepts.py [N] [REPEATS]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyhv.hypervisor import Partition, enter_long_mode  # noqa: E402
from pyhv.kvm import fastrun  # noqa: E402

BASE = 0x200000
STACK = 0x1FF000
MMIO_GPA = 0xD0000000
MSR = 0x40000000
DONE_PORT = 0xF4

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
3:  mov $0, %al
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
3:  mov $0, %al
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
    "-enable-kvm", "-cpu", "host", "-M", "microvm,x-option-roms=off,rtc=off", "-m", "64M",
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
        ["gcc", "-c", f"-DCOUNT={count}", f"-DLOOP={loop}", str(tmp / "q.S"), "-o", str(obj)],
        check=True,
    )
    subprocess.run(
        ["ld", "-nostdlib", "-static", "--no-warn-rwx-segments", "-T", str(tmp / "q.ld"),
         "-o", str(elf), str(obj)],
        check=True,
    )  # fmt: skip
    return elf


def run_qemu(qemu: str, tmp: Path, loop: str, n: int, repeats: int) -> float:
    def best_time(count: int) -> float:
        elf = build_qemu_guest(tmp, loop, count)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = subprocess.run(
                [qemu, *QEMU_ARGS, "-kernel", str(elf)], capture_output=True, timeout=300
            )
            dt = time.perf_counter() - t0
            if r.returncode != 1:  # isa-debug-exit: status (0 << 1) | 1
                raise RuntimeError(f"QEMU exited with {r.returncode}: {r.stderr.decode()[-300:]}")
            best = min(best, dt)
        return best

    return n / (best_time(n) - best_time(0))


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
    code: bytes, entry: int, n: int, time_handlers: bool = True, python_loop: bool = False
) -> float:
    """pyhv's rate; python_loop=True runs the VP on the Python fallback loop instead of C."""
    load = fastrun.load
    if python_loop:
        fastrun.load = lambda: None  # type: ignore[assignment]
    try:
        return _run_pyhv(code, entry, n, time_handlers, "python" if python_loop else None)
    finally:
        fastrun.load = load  # type: ignore[assignment]


def _run_pyhv(code: bytes, entry: int, n: int, time_handlers: bool, loop: str | None) -> float:
    with Partition("bench", time_handlers=time_handlers) as p:
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
        if loop is not None and vp.loop_kind != loop:
            raise RuntimeError(f"the VP ran the {vp.loop_kind} loop, not the {loop} loop")
        return n / (end[0] - t0)


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


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    result: dict[str, object] = {
        "label": "measured on PVM (kvm_pvm; CPL0 guest code emulated)",
        "n": n,
        "repeats": repeats,
    }
    result["pyhv_loop"] = "c" if fastrun.load() is not None else "python"
    if fastrun.why_unavailable():
        result["pyhv_loop_why_python"] = fastrun.why_unavailable()
    with tempfile.TemporaryDirectory(prefix="pyhv-bench-") as d:
        tmp = Path(d)
        code, syms, loop = build(tmp)
        for kind in ("io", "mmio", "msr"):
            entry = syms[f"{kind}_loop"]
            best_py = best_c = floor = untimed = py_loop = 0.0
            for _ in range(repeats):  # interleaved, so all see the same machine load
                best_c = max(best_c, run_c(loop, tmp / "g.bin", entry, n))
                best_py = max(best_py, run_pyhv(code, entry, n))
                if kind == "io":
                    floor = max(floor, run_python_floor(code, entry, n))
                    untimed = max(untimed, run_pyhv(code, entry, n, time_handlers=False))
                    py_loop = max(py_loop, run_pyhv(code, entry, n, python_loop=True))
            if kind == "io":
                result["io_python_floor_per_s"] = round(floor)
                result["io_ratio_vs_python_floor"] = round(best_py / floor, 3)
                result["io_pyhv_untimed_per_s"] = round(untimed)
                result["io_untimed_ratio_vs_c"] = round(untimed / best_c, 3)
                result["io_pyhv_python_loop_per_s"] = round(py_loop)
                result["io_python_loop_ratio_vs_c"] = round(py_loop / best_c, 3)
                print(
                    f"io    python floor {floor:.0f}/s, pyhv without handler timing {untimed:.0f}/s, "
                    f"pyhv on its Python loop {py_loop:.0f}/s"
                )
            result[f"{kind}_pyhv_per_s"] = round(best_py)
            result[f"{kind}_c_per_s"] = round(best_c)
            result[f"{kind}_ratio_vs_c"] = round(best_py / best_c, 3)
            print(
                f"{kind:5s} pyhv {best_py:10.0f}/s   C {best_c:10.0f}/s   ratio {best_py / best_c:.3f}"
            )
        qemu = shutil.which("qemu-system-x86_64")
        if qemu is None:
            result["qemu"] = "skipped: qemu-system-x86_64 not installed"
        else:
            result["qemu"] = qemu
            try:
                for kind in ("io", "mmio"):
                    rate = run_qemu(qemu, tmp, f"{kind}_loop", 5 * n, repeats)
                    result[f"{kind}_qemu_per_s"] = round(rate)
                    result[f"{kind}_pyhv_ratio_vs_qemu"] = round(
                        result[f"{kind}_pyhv_per_s"] / rate,  # type: ignore[operator]
                        3,
                    )
                    print(f"{kind:5s} QEMU {rate:10.0f}/s")
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                result["qemu"] = f"skipped: QEMU run failed: {e}"
    result["cpus"] = os.cpu_count()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
