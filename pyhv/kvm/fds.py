"""Thin typed wrappers over the three KVM file descriptors: system (/dev/kvm), VM and vCPU.

Each method is one ioctl. Errors from the kernel are re-raised as KvmError naming the ioctl.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import mmap
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pyhv.kvm import constants as c
from pyhv.kvm import structs as s
from pyhv.kvm.runpage import RunPage

if TYPE_CHECKING:
    from pyhv.kvm.dirtyring import DirtyRing


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed."""


def _ioctl(fd: int, req: int, arg: object, what: str) -> int:
    try:
        return fcntl.ioctl(fd, req, arg)  # type: ignore[call-overload, no-any-return]
    except OSError as e:
        raise KvmError(e.errno, f"{what} failed: {e.strerror}") from None


def address_of(buf: object) -> int:
    """Host virtual address of a writable buffer (mmap, bytearray, ctypes array)."""
    if isinstance(buf, ctypes.Array | ctypes.Structure):
        return ctypes.addressof(buf)
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))  # type: ignore[arg-type]


def _msrs_buffer(n: int) -> tuple[bytearray, memoryview]:
    """A struct kvm_msrs of n entries and its entries as 64-bit words (index, then data: the
    reserved half of the index word stays 0), filled and read by slices: a ctypes array of
    kvm_msr_entry, set and read field by field in Python, cost about half of a state save's
    MSR read and a third of its write here."""
    buf = bytearray(8 + 16 * max(n, 1))
    buf[0:4] = n.to_bytes(4, "little")
    return buf, memoryview(buf)[8 : 8 + 16 * n].cast("Q")


class Kvm:
    """/dev/kvm: capabilities, supported CPUID, MSR list; creates VMs."""

    def __init__(self, path: str = "/dev/kvm") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError(
                e.errno, f"cannot open {path}: {e.strerror} (is KVM loaded and accessible?)"
            ) from None
        version = _ioctl(self.fd, c.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != 12:
            raise KvmError(0, f"KVM API version {version}, expected 12")
        self.vcpu_mmap_size = _ioctl(self.fd, c.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        self._msr_indices: list[int] | None = None

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, c.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION")

    def supported_cpuid(self) -> ctypes.Structure:
        n = 64
        while True:
            buf = s.cpuid2_of(n)()
            buf.nent = n
            try:
                fcntl.ioctl(self.fd, c.KVM_GET_SUPPORTED_CPUID, buf)
                return buf
            except OSError as e:
                if e.errno != 7 or n >= 4096:  # E2BIG: grow the buffer
                    raise KvmError(
                        e.errno, f"KVM_GET_SUPPORTED_CPUID failed: {e.strerror}"
                    ) from None
                n *= 2

    def msr_index_list(self) -> list[int]:
        """The MSRs KVM saves and restores: fixed while the module is loaded, so read once
        (~0.06 ms inside a migration's pause, where a state save asked for it)."""
        if self._msr_indices is None:
            buf = s.msr_list_of(1024)()
            buf.nmsrs = 1024
            _ioctl(self.fd, c.KVM_GET_MSR_INDEX_LIST, buf, "KVM_GET_MSR_INDEX_LIST")
            self._msr_indices = [buf.indices[i] for i in range(buf.nmsrs)]
        return list(self._msr_indices)

    def create_vm(self) -> Vm:
        fd = _ioctl(self.fd, c.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A VM file descriptor: memory slots, interrupt controller, routing, eventfds, clock."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd

    def check_extension(self, cap: int) -> int:
        return _ioctl(self.fd, c.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION(vm)")

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        ec = s.kvm_enable_cap(cap=cap, flags=flags)
        for i, a in enumerate(args):
            ec.args[i] = a
        _ioctl(self.fd, c.KVM_ENABLE_CAP, ec, f"KVM_ENABLE_CAP({cap})")

    def set_user_memory_region(
        self, slot: int, gpa: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        r = s.kvm_userspace_memory_region(slot, flags, gpa, size, host_address)
        _ioctl(self.fd, c.KVM_SET_USER_MEMORY_REGION, r, f"KVM_SET_USER_MEMORY_REGION(slot {slot})")

    def get_dirty_log(self, slot: int, npages: int) -> bytearray:
        """Bitmap of pages written since the last call (one bit per page, bit 0 = first page)."""
        bm = (ctypes.c_uint64 * ((npages + 63) // 64))()
        _ioctl(
            self.fd,
            c.KVM_GET_DIRTY_LOG,
            s.kvm_dirty_log(slot, 0, ctypes.addressof(bm)),
            f"KVM_GET_DIRTY_LOG(slot {slot})",
        )
        return bytearray(bm)

    def clear_dirty_log(self, slot: int, first_page: int, bitmap: bytes) -> None:
        """Re-protect the pages set in bitmap (needs MANUAL_DIRTY_LOG_PROTECT2 enabled)."""
        if first_page % 64:
            raise ValueError(f"first_page {first_page} must be a multiple of 64")
        n = len(bitmap) * 8
        buf = (ctypes.c_uint8 * max(len(bitmap), 8)).from_buffer_copy(bitmap.ljust(8, b"\0"))
        _ioctl(
            self.fd,
            c.KVM_CLEAR_DIRTY_LOG,
            s.kvm_clear_dirty_log(slot, n, first_page, ctypes.addressof(buf)),
            f"KVM_CLEAR_DIRTY_LOG(slot {slot})",
        )

    def enable_dirty_ring(self, entries: int) -> None:
        """Log dirty pages in per-vCPU rings of `entries` entries instead of the bitmap (before
        the first vCPU; KVM_GET_DIRTY_LOG is refused from here on). The ACQ_REL form where the
        kernel has it (the same ring, with its memory order spelled out)."""
        acq_rel = self.kvm.check_extension(c.CAP_DIRTY_LOG_RING_ACQ_REL)
        cap = c.CAP_DIRTY_LOG_RING_ACQ_REL if acq_rel else c.CAP_DIRTY_LOG_RING
        largest = acq_rel or self.kvm.check_extension(c.CAP_DIRTY_LOG_RING)
        nbytes = entries * ctypes.sizeof(s.kvm_dirty_gfn)
        if not largest:
            raise KvmError(0, "this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING): use the bitmap")
        if nbytes > largest:
            raise KvmError(
                0,
                f"dirty ring of {entries} entries is larger than this KVM's "
                f"{largest // ctypes.sizeof(s.kvm_dirty_gfn)}",
            )
        self.enable_cap(cap, nbytes)

    def reset_dirty_rings(self) -> int:
        """KVM_RESET_DIRTY_RINGS: re-protect the pages of every harvested (RESET) entry and free
        those entries; returns how many."""
        return _ioctl(self.fd, c.KVM_RESET_DIRTY_RINGS, 0, "KVM_RESET_DIRTY_RINGS")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, c.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def irq_line(self, irq: int, level: int) -> None:
        _ioctl(self.fd, c.KVM_IRQ_LINE, s.kvm_irq_level(irq, level), f"KVM_IRQ_LINE({irq})")

    def signal_msi(self, address: int, data: int) -> int:
        m = s.kvm_msi(address & 0xFFFFFFFF, address >> 32, data, 0, 0)
        return _ioctl(self.fd, c.KVM_SIGNAL_MSI, m, "KVM_SIGNAL_MSI")

    def set_gsi_routing(self, entries: Sequence[s.kvm_irq_routing_entry]) -> None:
        table = s.irq_routing_of(max(len(entries), 1))()
        table.nr = len(entries)
        for i, e in enumerate(entries):
            table.entries[i] = e
        _ioctl(self.fd, c.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    def irqfd(self, fd: int, gsi: int, deassign: bool = False) -> None:
        flags = c.IRQFD_FLAG_DEASSIGN if deassign else 0
        _ioctl(self.fd, c.KVM_IRQFD, s.kvm_irqfd(fd, gsi, flags, 0), f"KVM_IRQFD(gsi {gsi})")

    def ioeventfd(
        self,
        addr: int,
        length: int,
        fd: int,
        datamatch: int | None = None,
        pio: bool = True,
        deassign: bool = False,
    ) -> None:
        flags = (c.IOEVENTFD_FLAG_PIO if pio else 0) | (
            c.IOEVENTFD_FLAG_DEASSIGN if deassign else 0
        )
        if datamatch is not None:
            flags |= c.IOEVENTFD_FLAG_DATAMATCH
        ev = s.kvm_ioeventfd(datamatch or 0, addr, length, fd, flags)
        _ioctl(self.fd, c.KVM_IOEVENTFD, ev, f"KVM_IOEVENTFD({addr:#x})")

    def set_msr_filter(self, f: s.kvm_msr_filter) -> None:
        _ioctl(self.fd, c.KVM_X86_SET_MSR_FILTER, f, "KVM_X86_SET_MSR_FILTER")

    def get_irqchip(self, chip_id: int) -> s.kvm_irqchip:
        ic = s.kvm_irqchip(chip_id=chip_id)
        _ioctl(self.fd, c.KVM_GET_IRQCHIP, ic, f"KVM_GET_IRQCHIP({chip_id})")
        return ic

    def set_irqchip(self, ic: s.kvm_irqchip) -> None:
        _ioctl(self.fd, c.KVM_SET_IRQCHIP, ic, f"KVM_SET_IRQCHIP({ic.chip_id})")

    def get_clock(self) -> s.kvm_clock_data:
        cd = s.kvm_clock_data()
        _ioctl(self.fd, c.KVM_GET_CLOCK, cd, "KVM_GET_CLOCK")
        return cd

    def set_clock(self, cd: s.kvm_clock_data) -> None:
        _ioctl(self.fd, c.KVM_SET_CLOCK, cd, "KVM_SET_CLOCK")

    def create_vcpu(self, index: int) -> Vcpu:
        fd = _ioctl(self.fd, c.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU({index})")
        return Vcpu(self, fd, index)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """A vCPU file descriptor and its kvm_run page."""

    def __init__(self, vm: Vm, fd: int, index: int) -> None:
        self.vm = vm
        self.fd = fd
        self.index = index
        mm = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = RunPage(mm)

    def run(self) -> int:
        """One KVM_RUN; returns the exit reason. Raises InterruptedError when kicked."""
        fcntl.ioctl(self.fd, c.KVM_RUN, 0)
        return self.run_page.i[2]

    def _get(self, req: int, obj: ctypes.Structure, what: str) -> ctypes.Structure:
        _ioctl(self.fd, req, obj, what)
        return obj

    def get_regs(self) -> s.kvm_regs:
        return self._get(c.KVM_GET_REGS, s.kvm_regs(), "KVM_GET_REGS")  # type: ignore[return-value]

    def set_regs(self, r: s.kvm_regs) -> None:
        _ioctl(self.fd, c.KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> s.kvm_sregs:
        return self._get(c.KVM_GET_SREGS, s.kvm_sregs(), "KVM_GET_SREGS")  # type: ignore[return-value]

    def set_sregs(self, r: s.kvm_sregs) -> None:
        _ioctl(self.fd, c.KVM_SET_SREGS, r, "KVM_SET_SREGS")

    def get_fpu(self) -> s.kvm_fpu:
        return self._get(c.KVM_GET_FPU, s.kvm_fpu(), "KVM_GET_FPU")  # type: ignore[return-value]

    def set_fpu(self, f: s.kvm_fpu) -> None:
        _ioctl(self.fd, c.KVM_SET_FPU, f, "KVM_SET_FPU")

    def get_xsave(self) -> bytes:
        return bytes(self._get(c.KVM_GET_XSAVE, s.kvm_xsave(), "KVM_GET_XSAVE"))

    def set_xsave(self, area: bytes) -> None:
        if len(area) != ctypes.sizeof(s.kvm_xsave):
            raise ValueError(f"XSAVE area is {len(area)} bytes, expected 4096")
        _ioctl(self.fd, c.KVM_SET_XSAVE, s.kvm_xsave.from_buffer_copy(area), "KVM_SET_XSAVE")

    def get_xcrs(self) -> s.kvm_xcrs:
        return self._get(c.KVM_GET_XCRS, s.kvm_xcrs(), "KVM_GET_XCRS")  # type: ignore[return-value]

    def set_xcrs(self, x: s.kvm_xcrs) -> None:
        _ioctl(self.fd, c.KVM_SET_XCRS, x, "KVM_SET_XCRS")

    def get_lapic(self) -> s.kvm_lapic_state:
        return self._get(c.KVM_GET_LAPIC, s.kvm_lapic_state(), "KVM_GET_LAPIC")  # type: ignore[return-value]

    def set_lapic(self, x: s.kvm_lapic_state) -> None:
        _ioctl(self.fd, c.KVM_SET_LAPIC, x, "KVM_SET_LAPIC")

    def get_vcpu_events(self) -> s.kvm_vcpu_events:
        return self._get(c.KVM_GET_VCPU_EVENTS, s.kvm_vcpu_events(), "KVM_GET_VCPU_EVENTS")  # type: ignore[return-value]

    def set_vcpu_events(self, x: s.kvm_vcpu_events) -> None:
        _ioctl(self.fd, c.KVM_SET_VCPU_EVENTS, x, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        st = s.kvm_mp_state()
        _ioctl(self.fd, c.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return int(st.mp_state)

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, c.KVM_SET_MP_STATE, s.kvm_mp_state(state), "KVM_SET_MP_STATE")

    def get_debugregs(self) -> s.kvm_debugregs:
        return self._get(c.KVM_GET_DEBUGREGS, s.kvm_debugregs(), "KVM_GET_DEBUGREGS")  # type: ignore[return-value]

    def set_debugregs(self, x: s.kvm_debugregs) -> None:
        _ioctl(self.fd, c.KVM_SET_DEBUGREGS, x, "KVM_SET_DEBUGREGS")

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        _ioctl(self.fd, c.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Values of the MSRs KVM could read, in order; stops at the first it cannot."""
        buf, words = _msrs_buffer(len(indices))
        words[0::2] = array.array("Q", indices)
        n = _ioctl(self.fd, c.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
        return dict(zip(indices[:n], words[1 : 2 * n : 2], strict=True))

    def set_msrs(self, values: Iterable[tuple[int, int]]) -> int:
        """Returns how many were set (KVM stops at the first one it refuses)."""
        items = list(values)
        buf, words = _msrs_buffer(len(items))
        words[0::2] = array.array("Q", [ix for ix, _ in items])
        words[1::2] = array.array("Q", [val for _, val in items])
        return _ioctl(self.fd, c.KVM_SET_MSRS, buf, "KVM_SET_MSRS")

    def set_guest_debug(self, control: int, debugreg: Sequence[int] = ()) -> None:
        g = s.kvm_guest_debug(control=control)
        for i, v in enumerate(debugreg):
            g.debugreg[i] = v
        _ioctl(self.fd, c.KVM_SET_GUEST_DEBUG, g, "KVM_SET_GUEST_DEBUG")

    def dirty_ring(self, entries: int) -> DirtyRing:
        """This vCPU's dirty ring, mapped (the VM's ring enabled with `entries` entries)."""
        from pyhv.kvm.dirtyring import map_ring

        try:
            return map_ring(self.fd, entries)
        except OSError as e:
            raise KvmError(e.errno, f"mapping the dirty ring of vCPU {self.index}: {e}") from None

    def open_stats(self) -> VcpuStats:
        """KVM_GET_STATS_FD: this vCPU's statistics (halt_exits, blocking, ...), readable while
        it runs. Open it before KVM_RUN: the ioctl waits for the vCPU's lock, which a running
        vCPU holds."""
        return VcpuStats(_ioctl(self.fd, c.KVM_GET_STATS_FD, 0, "KVM_GET_STATS_FD"))

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.release()
            os.close(self.fd)
            self.fd = -1


class VcpuStats:
    """A vCPU's binary statistics file: names read once, values read at each `read()`."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        head = s.kvm_stats_header.from_buffer_copy(
            os.pread(fd, ctypes.sizeof(s.kvm_stats_header), 0)
        )
        self._data_offset = head.data_offset
        size = ctypes.sizeof(s.kvm_stats_desc) + head.name_size
        descs = os.pread(fd, size * head.num_desc, head.desc_offset)
        self._where: dict[str, int] = {}  # name -> offset in the data block (one-value stats)
        for i in range(head.num_desc):
            d = s.kvm_stats_desc.from_buffer_copy(descs, i * size)
            if d.size == 1:  # histograms are left out
                at = i * size + ctypes.sizeof(s.kvm_stats_desc)
                name = descs[at : at + head.name_size].split(b"\0", 1)[0].decode()
                self._where[name] = d.offset
        self._data_size = max(self._where.values(), default=0) + 8  # what read() reads

    def read(self) -> dict[str, int]:
        """{name: value} of every one-value statistic, e.g. halt_exits, halt_wakeup, blocking."""
        data = os.pread(self.fd, self._data_size, self._data_offset)
        return {n: int.from_bytes(data[o : o + 8], "little") for n, o in self._where.items()}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
