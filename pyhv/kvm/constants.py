"""KVM ioctl numbers, capabilities, exit reasons and flags (include/uapi/linux/kvm.h)."""

from __future__ import annotations

import ctypes

from pyhv.kvm import structs as s

_KVMIO = 0xAE


def _io(nr: int) -> int:
    return (_KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (_KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (_KVMIO << 8) | nr


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (_KVMIO << 8) | nr


def _sz(t: type) -> int:
    return ctypes.sizeof(t)


# system ioctls
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, _sz(s.kvm_msr_list))
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, _sz(s.kvm_cpuid2))
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, _sz(s.kvm_dirty_log))
KVM_SET_USER_MEMORY_REGION = _iow(0x46, _sz(s.kvm_userspace_memory_region))
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, _sz(s.kvm_irq_level))
KVM_GET_IRQCHIP = _iowr(0x62, _sz(s.kvm_irqchip))
KVM_SET_IRQCHIP = _ior(0x63, _sz(s.kvm_irqchip))  # the kernel really declares it _IOR
KVM_SET_GSI_ROUTING = _iow(0x6A, _sz(s.kvm_irq_routing))
KVM_IRQFD = _iow(0x76, _sz(s.kvm_irqfd))
KVM_IOEVENTFD = _iow(0x79, _sz(s.kvm_ioeventfd))
KVM_SET_CLOCK = _iow(0x7B, _sz(s.kvm_clock_data))
KVM_GET_CLOCK = _ior(0x7C, _sz(s.kvm_clock_data))
KVM_SIGNAL_MSI = _iow(0xA5, _sz(s.kvm_msi))
KVM_ENABLE_CAP = _iow(0xA3, _sz(s.kvm_enable_cap))
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, _sz(s.kvm_clear_dirty_log))
KVM_X86_SET_MSR_FILTER = _iow(0xC6, _sz(s.kvm_msr_filter))
KVM_RESET_DIRTY_RINGS = _io(0xC7)
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, _sz(s.kvm_regs))
KVM_SET_REGS = _iow(0x82, _sz(s.kvm_regs))
KVM_GET_SREGS = _ior(0x83, _sz(s.kvm_sregs))
KVM_SET_SREGS = _iow(0x84, _sz(s.kvm_sregs))
KVM_GET_MSRS = _iowr(0x88, _sz(s.kvm_msrs))
KVM_SET_MSRS = _iow(0x89, _sz(s.kvm_msrs))
KVM_GET_FPU = _ior(0x8C, _sz(s.kvm_fpu))
KVM_SET_FPU = _iow(0x8D, _sz(s.kvm_fpu))
KVM_GET_LAPIC = _ior(0x8E, _sz(s.kvm_lapic_state))
KVM_SET_LAPIC = _iow(0x8F, _sz(s.kvm_lapic_state))
KVM_SET_CPUID2 = _iow(0x90, _sz(s.kvm_cpuid2))
KVM_GET_CPUID2 = _iowr(0x91, _sz(s.kvm_cpuid2))
KVM_GET_MP_STATE = _ior(0x98, _sz(s.kvm_mp_state))
KVM_SET_MP_STATE = _iow(0x99, _sz(s.kvm_mp_state))
KVM_SET_GUEST_DEBUG = _iow(0x9B, _sz(s.kvm_guest_debug))
KVM_GET_VCPU_EVENTS = _ior(0x9F, _sz(s.kvm_vcpu_events))
KVM_SET_VCPU_EVENTS = _iow(0xA0, _sz(s.kvm_vcpu_events))
KVM_GET_DEBUGREGS = _ior(0xA1, _sz(s.kvm_debugregs))
KVM_SET_DEBUGREGS = _iow(0xA2, _sz(s.kvm_debugregs))
KVM_GET_XSAVE = _ior(0xA4, _sz(s.kvm_xsave))
KVM_SET_XSAVE = _iow(0xA5, _sz(s.kvm_xsave))
KVM_GET_XCRS = _ior(0xA6, _sz(s.kvm_xcrs))
KVM_SET_XCRS = _iow(0xA7, _sz(s.kvm_xcrs))
KVM_GET_XSAVE2 = _ior(0xCF, _sz(s.kvm_xsave))
KVM_GET_STATS_FD = _io(0xCE)  # on a vCPU: its binary statistics file

# capabilities (KVM_CHECK_EXTENSION)
CAP_IRQCHIP = 0
CAP_USER_MEMORY = 3
CAP_NR_MEMSLOTS = 10
CAP_MP_STATE = 14
CAP_SET_GUEST_DEBUG = 23
CAP_IRQ_ROUTING = 25
CAP_IRQFD = 32
CAP_IOEVENTFD = 36
CAP_ADJUST_CLOCK = 39
CAP_VCPU_EVENTS = 41
CAP_DEBUGREGS = 50
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_SYNC_REGS = 74
CAP_SIGNAL_MSI = 77
CAP_READONLY_MEM = 81
CAP_GUEST_DEBUG_HW_BPS = 119
CAP_IMMEDIATE_EXIT = 136
CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
CAP_X86_USER_SPACE_MSR = 188
CAP_X86_MSR_FILTER = 189
CAP_DIRTY_LOG_RING = 192  # args[0]: bytes of each vCPU's ring; the check gives the largest
CAP_DIRTY_LOG_RING_ACQ_REL = 223  # the same ring, with acquire/release order spelled out
CAP_XSAVE2 = 208

# memory slot flags
MEM_LOG_DIRTY_PAGES = 1 << 0
MEM_READONLY = 1 << 1

# dirty ring (KVM_CAP_DIRTY_LOG_RING): the rings are mmapped at this page of a vCPU fd (x86)
DIRTY_LOG_PAGE_OFFSET = 64
DIRTY_GFN_F_DIRTY = 1 << 0  # set by KVM: the entry holds a dirty page
DIRTY_GFN_F_RESET = 1 << 1  # set by user space once harvested; KVM_RESET_DIRTY_RINGS recycles it

# exit reasons (kvm_run.exit_reason)
EXIT_UNKNOWN = 0
EXIT_EXCEPTION = 1
EXIT_IO = 2
EXIT_HYPERCALL = 3
EXIT_DEBUG = 4
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_IRQ_WINDOW_OPEN = 7
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24
EXIT_IOAPIC_EOI = 26
EXIT_HYPERV = 27
EXIT_X86_RDMSR = 29
EXIT_X86_WRMSR = 30
EXIT_DIRTY_RING_FULL = 31
EXIT_MEMORY_FAULT = 39

EXIT_NAMES = {
    v: k[5:] for k, v in globals().items() if k.startswith("EXIT_") and isinstance(v, int)
}

IO_IN = 0
IO_OUT = 1

# user-space MSR exit reasons (KVM_CAP_X86_USER_SPACE_MSR args[0] and kvm_run.msr.reason)
MSR_EXIT_REASON_INVAL = 1
MSR_EXIT_REASON_UNKNOWN = 2
MSR_EXIT_REASON_FILTER = 4
MSR_FILTER_DEFAULT_ALLOW = 0
MSR_FILTER_READ = 1
MSR_FILTER_WRITE = 2

# KVM_SET_GUEST_DEBUG control
GUESTDBG_ENABLE = 0x1
GUESTDBG_SINGLESTEP = 0x2
GUESTDBG_USE_SW_BP = 0x10000
GUESTDBG_USE_HW_BP = 0x20000
GUESTDBG_INJECT_DB = 0x40000
GUESTDBG_INJECT_BP = 0x80000

# ioeventfd flags
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
IOEVENTFD_FLAG_DEASSIGN = 1 << 2
IRQFD_FLAG_DEASSIGN = 1 << 0

# GSI routing
IRQ_ROUTING_IRQCHIP = 1
IRQ_ROUTING_MSI = 2
IRQCHIP_PIC_MASTER = 0
IRQCHIP_PIC_SLAVE = 1
IRQCHIP_IOAPIC = 2

# MP states
MP_STATE_RUNNABLE = 0
MP_STATE_UNINITIALIZED = 1
MP_STATE_INIT_RECEIVED = 2
MP_STATE_HALTED = 3

# system events
SYSTEM_EVENT_SHUTDOWN = 1
SYSTEM_EVENT_RESET = 2
SYSTEM_EVENT_CRASH = 3

# internal error sub-reasons
INTERNAL_ERROR_EMULATION = 1
INTERNAL_ERROR_SIMUL_EX = 2
INTERNAL_ERROR_DELIVERY_EV = 3
INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4

# XSAVE header: XSTATE_BV is at byte 512 of the XSAVE area
XSAVE_XSTATE_BV_OFFSET = 512
