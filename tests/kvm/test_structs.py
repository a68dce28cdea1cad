"""The binding's C layouts and ioctl numbers are the kernel's: checked against <linux/kvm.h>."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pyhv.kvm import constants as c
from pyhv.kvm import structs as s

pytestmark = pytest.mark.unit

STRUCTS = {
    "kvm_regs": s.kvm_regs,
    "kvm_sregs": s.kvm_sregs,
    "kvm_segment": s.kvm_segment,
    "kvm_dtable": s.kvm_dtable,
    "kvm_fpu": s.kvm_fpu,
    "kvm_xsave": s.kvm_xsave,
    "kvm_xcrs": s.kvm_xcrs,
    "kvm_lapic_state": s.kvm_lapic_state,
    "kvm_vcpu_events": s.kvm_vcpu_events,
    "kvm_mp_state": s.kvm_mp_state,
    "kvm_debugregs": s.kvm_debugregs,
    "kvm_clock_data": s.kvm_clock_data,
    "kvm_irqchip": s.kvm_irqchip,
    "kvm_guest_debug": s.kvm_guest_debug,
    "kvm_userspace_memory_region": s.kvm_userspace_memory_region,
    "kvm_dirty_log": s.kvm_dirty_log,
    "kvm_clear_dirty_log": s.kvm_clear_dirty_log,
    "kvm_enable_cap": s.kvm_enable_cap,
    "kvm_cpuid_entry2": s.kvm_cpuid_entry2,
    "kvm_cpuid2": s.kvm_cpuid2,
    "kvm_msr_entry": s.kvm_msr_entry,
    "kvm_msrs": s.kvm_msrs,
    "kvm_msr_list": s.kvm_msr_list,
    "kvm_msr_filter_range": s.kvm_msr_filter_range,
    "kvm_msr_filter": s.kvm_msr_filter,
    "kvm_irq_level": s.kvm_irq_level,
    "kvm_msi": s.kvm_msi,
    "kvm_irqfd": s.kvm_irqfd,
    "kvm_ioeventfd": s.kvm_ioeventfd,
    "kvm_irq_routing_entry": s.kvm_irq_routing_entry,
    "kvm_irq_routing": s.kvm_irq_routing,
    "kvm_stats_header": s.kvm_stats_header,
    "kvm_stats_desc": s.kvm_stats_desc,
}

# (C expression, our value)
OFFSETS = {
    "offsetof(struct kvm_run, immediate_exit)": 1,
    "offsetof(struct kvm_run, exit_reason)": 8,
    "offsetof(struct kvm_run, io)": s.RUN_UNION,
    "offsetof(struct kvm_run, io.port)": s.RUN_UNION + 2,
    "offsetof(struct kvm_run, io.count)": s.RUN_UNION + 4,
    "offsetof(struct kvm_run, io.data_offset)": s.RUN_UNION + 8,
    "offsetof(struct kvm_run, mmio.data)": s.RUN_UNION + 8,
    "offsetof(struct kvm_run, mmio.len)": s.RUN_UNION + 16,
    "offsetof(struct kvm_run, mmio.is_write)": s.RUN_UNION + 20,
    "offsetof(struct kvm_run, msr.reason)": s.RUN_UNION + 8,
    "offsetof(struct kvm_run, msr.index)": s.RUN_UNION + 12,
    "offsetof(struct kvm_run, msr.data)": s.RUN_UNION + 16,
    "offsetof(struct kvm_run, debug.arch.pc)": s.RUN_UNION + 8,
    "offsetof(struct kvm_run, internal.data)": s.RUN_UNION + 8,
    "offsetof(struct kvm_run, kvm_valid_regs)": s.RUN_KVM_VALID_REGS,
    "offsetof(struct kvm_vcpu_events, exception_payload)": s.kvm_vcpu_events.exception_payload.offset,
    "offsetof(struct kvm_vcpu_events, triple_fault)": s.kvm_vcpu_events.triple_fault_pending.offset,
    "offsetof(struct kvm_sregs, efer)": s.kvm_sregs.efer.offset,
    "offsetof(struct kvm_fpu, mxcsr)": s.kvm_fpu.mxcsr.offset,
    "offsetof(struct kvm_msr_filter_range, bitmap)": s.kvm_msr_filter_range.bitmap.offset,
}
IOCTLS = [n for n in dir(c) if n.startswith("KVM_") and n not in ("KVM_SET_IRQCHIP",)]


def _kernel_values(tmp_path: Path) -> dict[str, int]:
    exprs = {f"sizeof(struct {n})": None for n in STRUCTS} | dict.fromkeys(OFFSETS)
    exprs |= dict.fromkeys(IOCTLS)
    lines = "\n".join(f'    printf("%s=%llu\\n", "{e}", (unsigned long long)({e}));' for e in exprs)
    src = tmp_path / "layout.c"
    src.write_text(
        "#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n"
        f"int main(void) {{\n{lines}\n    return 0;\n}}\n"
    )
    exe = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split("=", 1) for line in out.splitlines())}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    assert shutil.which("gcc") is not None, "gcc is missing: apt-get install -y gcc"
    assert Path("/usr/include/linux/kvm.h").exists(), (
        "<linux/kvm.h> is missing: apt-get install -y linux-libc-dev"
    )
    return _kernel_values(tmp_path_factory.mktemp("layout"))


def test_every_struct_has_the_size_the_kernel_declares(kernel: dict[str, int]) -> None:
    wrong = {
        n: (ctypes.sizeof(t), kernel[f"sizeof(struct {n})"])
        for n, t in STRUCTS.items()
        if ctypes.sizeof(t) != kernel[f"sizeof(struct {n})"]
    }
    assert wrong == {}


def test_kvm_run_and_state_fields_sit_at_the_kernels_offsets(kernel: dict[str, int]) -> None:
    wrong = {e: (ours, kernel[e]) for e, ours in OFFSETS.items() if ours != kernel[e]}
    assert wrong == {}


def test_every_ioctl_number_is_the_kernels(kernel: dict[str, int]) -> None:
    wrong = {n: (hex(getattr(c, n)), hex(kernel[n])) for n in IOCTLS if getattr(c, n) != kernel[n]}
    assert wrong == {}
    assert c.KVM_SET_IRQCHIP == 0x8208AE63  # declared _IOR in the kernel
