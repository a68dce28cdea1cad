"""The C layouts of the KVM API (include/uapi/linux/kvm.h, arch/x86/include/uapi/asm/kvm.h).

Declared once as ctypes structures; tests compare every size and offset with the kernel's headers.
"""

from __future__ import annotations

import ctypes
from functools import cache

u8, u16, u32, u64, s32 = (
    ctypes.c_uint8,
    ctypes.c_uint16,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_int32,
)

_GPRS = "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()


class kvm_regs(ctypes.Structure):
    _fields_ = [(n, u64) for n in _GPRS]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CONTROL_NAMES = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")


class kvm_sregs(ctypes.Structure):
    _fields_ = (
        [(n, kvm_segment) for n in SEGMENT_NAMES]
        + [("gdt", kvm_dtable), ("idt", kvm_dtable)]
        + [(n, u64) for n in CONTROL_NAMES]
        + [("interrupt_bitmap", u64 * 4)]
    )


class kvm_fpu(ctypes.Structure):
    _fields_ = [
        ("fpr", u8 * 128),
        ("fcw", u16),
        ("fsw", u16),
        ("ftwx", u8),
        ("pad1", u8),
        ("last_opcode", u16),
        ("last_ip", u64),
        ("last_dp", u64),
        ("xmm", u8 * 256),
        ("mxcsr", u32),
        ("pad2", u32),
    ]


class kvm_xsave(ctypes.Structure):
    # The legacy 4 KiB form; KVM_GET_XSAVE2 may need more (see Vcpu.get_xsave).
    _fields_ = [("region", u32 * 1024)]


class kvm_xcr(ctypes.Structure):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(ctypes.Structure):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_lapic_state(ctypes.Structure):
    _fields_ = [("regs", u8 * 1024)]


class kvm_vcpu_events(ctypes.Structure):
    _fields_ = [
        ("exception_injected", u8),
        ("exception_nr", u8),
        ("exception_has_error_code", u8),
        ("exception_pending", u8),
        ("exception_error_code", u32),
        ("interrupt_injected", u8),
        ("interrupt_nr", u8),
        ("interrupt_soft", u8),
        ("interrupt_shadow", u8),
        ("nmi_injected", u8),
        ("nmi_pending", u8),
        ("nmi_masked", u8),
        ("nmi_pad", u8),
        ("sipi_vector", u32),
        ("flags", u32),
        ("smi_smm", u8),
        ("smi_pending", u8),
        ("smi_smm_inside_nmi", u8),
        ("smi_latched_init", u8),
        ("triple_fault_pending", u8),
        ("reserved", u8 * 26),
        ("exception_has_payload", u8),
        ("exception_payload", u64),
    ]


class kvm_mp_state(ctypes.Structure):
    _fields_ = [("mp_state", u32)]


class kvm_stats_header(ctypes.Structure):
    """Start of a binary statistics file (KVM_GET_STATS_FD)."""

    _fields_ = [
        ("flags", u32),
        ("name_size", u32),
        ("num_desc", u32),
        ("id_offset", u32),
        ("desc_offset", u32),
        ("data_offset", u32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """One statistic's descriptor; its name (name_size bytes) follows it."""

    _fields_ = [
        ("flags", u32),
        ("exponent", ctypes.c_int16),
        ("size", ctypes.c_uint16),
        ("offset", u32),
        ("bucket_size", u32),
    ]


class kvm_debugregs(ctypes.Structure):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


class kvm_clock_data(ctypes.Structure):
    _fields_ = [
        ("clock", u64),
        ("flags", u32),
        ("pad0", u32),
        ("realtime", u64),
        ("host_tsc", u64),
        ("pad", u32 * 4),
    ]


class kvm_irqchip(ctypes.Structure):
    _fields_ = [("chip_id", u32), ("pad", u32), ("chip", u8 * 512)]


class kvm_guest_debug(ctypes.Structure):
    _fields_ = [("control", u32), ("pad", u32), ("debugreg", u64 * 8)]


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_dirty_gfn(ctypes.Structure):
    """One entry of a vCPU's dirty ring (KVM_CAP_DIRTY_LOG_RING): flags DIRTY/RESET, the slot
    ((address space << 16) | slot id) and the page's offset in that slot."""

    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; the entries follow (see cpuid2_of)."""

    _fields_ = [("nent", u32), ("padding", u32)]


@cache
def cpuid2_of(n: int) -> type[ctypes.Structure]:
    class _Cpuid2(ctypes.Structure):
        _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * n)]

    return _Cpuid2


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries (kvm_msr_entry) follow (see fds._msrs_buffer)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; the indices follow (see msr_list_of)."""

    _fields_ = [("nmsrs", u32)]


@cache
def msr_list_of(n: int) -> type[ctypes.Structure]:
    class _MsrList(ctypes.Structure):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return _MsrList


class kvm_msr_filter_range(ctypes.Structure):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("bitmap", u64)]


MSR_FILTER_MAX_RANGES = 16
MSR_FILTER_MAX_BITMAP_BYTES = 0x600


class kvm_msr_filter(ctypes.Structure):
    _fields_ = [("flags", u32), ("ranges", kvm_msr_filter_range * MSR_FILTER_MAX_RANGES)]


class kvm_irq_level(ctypes.Structure):
    _fields_ = [("irq", u32), ("level", u32)]


class kvm_msi(ctypes.Structure):
    _fields_ = [
        ("address_lo", u32),
        ("address_hi", u32),
        ("data", u32),
        ("flags", u32),
        ("devid", u32),
        ("pad", u8 * 12),
    ]


class kvm_irqfd(ctypes.Structure):
    _fields_ = [("fd", u32), ("gsi", u32), ("flags", u32), ("resamplefd", u32), ("pad", u8 * 16)]


class kvm_ioeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", u64),
        ("addr", u64),
        ("len", u32),
        ("fd", s32),
        ("flags", u32),
        ("pad", u8 * 36),
    ]


class kvm_irq_routing_irqchip(ctypes.Structure):
    _fields_ = [("irqchip", u32), ("pin", u32)]


class kvm_irq_routing_msi(ctypes.Structure):
    _fields_ = [("address_lo", u32), ("address_hi", u32), ("data", u32), ("devid", u32)]


class _routing_union(ctypes.Union):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", u32 * 8),
    ]


class kvm_irq_routing_entry(ctypes.Structure):
    _fields_ = [("gsi", u32), ("type", u32), ("flags", u32), ("pad", u32), ("u", _routing_union)]


class kvm_irq_routing(ctypes.Structure):
    """Header only; the entries follow (see irq_routing_of)."""

    _fields_ = [("nr", u32), ("flags", u32)]


@cache
def irq_routing_of(n: int) -> type[ctypes.Structure]:
    class _Routing(ctypes.Structure):
        _fields_ = [("nr", u32), ("flags", u32), ("entries", kvm_irq_routing_entry * n)]

    return _Routing


# struct kvm_run: the fixed header, the exit union at RUN_UNION (256 bytes) and sync regs after it.
class kvm_run_header(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
    ]


RUN_UNION = 32  # offsetof(struct kvm_run, io) etc.
RUN_UNION_SIZE = 256
RUN_KVM_VALID_REGS = RUN_UNION + RUN_UNION_SIZE  # 288
RUN_KVM_DIRTY_REGS = RUN_KVM_VALID_REGS + 8


class kvm_run_io(ctypes.Structure):
    _fields_ = [
        ("direction", u8),
        ("size", u8),
        ("port", u16),
        ("count", u32),
        ("data_offset", u64),
    ]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_msr(ctypes.Structure):
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class kvm_debug_exit_arch(ctypes.Structure):
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]
