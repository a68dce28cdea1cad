"""Partitions: the hypervisor's unit of isolation (a KVM VM) with its GPA space, VPs and intercepts."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyhv.hypervisor.intercepts import InterceptKind, InterceptTable
from pyhv.hypervisor.memory import GpaSpace, MemoryRegion
from pyhv.hypervisor.pagetables import translate
from pyhv.hypervisor.vp import VirtualProcessor, VpState
from pyhv.kvm import Kvm, KvmError
from pyhv.kvm import constants as c
from pyhv.kvm import structs as ks

if TYPE_CHECKING:
    from pyhv.hypervisor.dirtyring import DirtyRings
    from pyhv.hypervisor.state import PartitionState

LAPIC_MSI_BASE = 0xFEE00000
IOAPIC_PINS = 24


@dataclass(eq=False)
class IoEventFd:
    """A doorbell: a guest write to `address` signals `fd` in the kernel, with no exit."""

    address: int
    length: int
    fd: int
    datamatch: int | None
    mmio: bool
    _partition: Partition

    def remove(self) -> None:
        self._partition.vm.ioeventfd(
            self.address, self.length, self.fd, self.datamatch, pio=not self.mmio, deassign=True
        )


class Partition:
    """A guest partition: a KVM VM with the in-kernel interrupt controller (LAPIC + IOAPIC + PIC).

    Use as a context manager or call close().
    """

    def __init__(
        self,
        name: str = "vm",
        irqchip: bool = True,
        time_handlers: bool = True,
        dirty_ring_entries: int = 0,
    ) -> None:
        self.name = name
        # counters["..."]["handler_seconds"]; False saves two clock reads per intercept
        self.time_handlers = time_handlers
        self.kvm = Kvm()
        try:
            self.vm = self.kvm.create_vm()
        except BaseException:
            self.kvm.close()
            raise
        self._closed = False
        self._lock = threading.Lock()
        #: Dirty pages logged in a ring per VP (KVM_CAP_DIRTY_LOG_RING) instead of the bitmap:
        #: chosen at creation, before the first VP (pyhv.hypervisor.dirtyring)
        self.dirty_rings: DirtyRings | None = None
        if dirty_ring_entries:
            self._enable_dirty_rings(dirty_ring_entries)
        self.irqchip = irqchip
        if irqchip:
            self.vm.create_irqchip()
        self.cpuid = self.kvm.supported_cpuid()
        self.max_gpa = 1 << self._phys_bits()
        self.gpa_space = GpaSpace(
            self.vm, self.max_gpa, self.kvm.check_extension(c.CAP_NR_MEMSLOTS) or 32
        )
        if dirty_ring_entries:
            from pyhv.hypervisor.dirtyring import DirtyRings

            self.dirty_rings = DirtyRings(self.vm, dirty_ring_entries, self.gpa_space.slot_pages)
            self.gpa_space.dirty_source = self.dirty_rings.bitmap
        self.msr_exits = bool(self.kvm.check_extension(c.CAP_X86_USER_SPACE_MSR))
        if self.msr_exits:
            # unknown/invalid MSRs come to user space too, so they are counted (then #GP)
            self.vm.enable_cap(
                c.CAP_X86_USER_SPACE_MSR,
                c.MSR_EXIT_REASON_INVAL | c.MSR_EXIT_REASON_UNKNOWN | c.MSR_EXIT_REASON_FILTER,
            )
        self.intercepts = InterceptTable(self)
        self.vps: dict[int, VirtualProcessor] = {}
        self._eventfds: list[int] = []
        self._msi_routes: list[tuple[int, int]] = []

    def _enable_dirty_rings(self, entries: int) -> None:
        """On the VM before any VP (KVM's rule); the rings are mapped per VP as they come."""
        from pyhv.kvm.dirtyring import check_entries

        try:
            check_entries(entries)
            self.vm.enable_dirty_ring(entries)
        except BaseException:
            self.vm.close()
            self.kvm.close()
            raise

    def _phys_bits(self) -> int:
        for i in range(self.cpuid.nent):
            e = self.cpuid.entries[i]
            if e.function == 0x80000008:
                return int(e.eax & 0xFF) or 36
        return 36

    def __enter__(self) -> Partition:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<Partition {self.name!r} vps={len(self.vps)} regions={len(self.gpa_space.regions)}>"
        )

    # ------------------------------------------------------------------ memory
    def add_memory(
        self,
        gpa: int,
        size: int,
        readonly: bool = False,
        track_dirty: bool = False,
        memfd: int | None = None,
        offset: int = 0,
        register: bool = True,
    ) -> MemoryRegion:
        """Back [gpa, gpa+size) with RAM (a new memfd, or `memfd` at `offset` to share pages).
        Safe while VPs run: they see the region from their next access. `register=False`:
        not in KVM's slots until :meth:`register_memory` (for a migration's destination)."""
        return self.gpa_space.add(
            gpa, size, readonly, track_dirty, memfd, offset, f"{self.name}-ram", register
        )

    def register_memory(self) -> None:
        """Every region added with register=False into its KVM memory slot."""
        for r in self.gpa_space.regions:
            self.gpa_space.register(r)

    def remove_memory(self, region: MemoryRegion) -> None:
        self.gpa_space.remove(region)

    @property
    def regions(self) -> list[MemoryRegion]:
        return self.gpa_space.regions

    @property
    def ram(self) -> list[MemoryRegion]:
        """The guest's writable RAM regions (not its read-only ones: the firmware image)."""
        return [r for r in self.gpa_space.regions if not r.readonly]

    def read(self, gpa: int, n: int) -> bytes:
        return self.gpa_space.read(gpa, n)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.gpa_space.write(gpa, data)

    def view(self, gpa: int, n: int) -> memoryview:
        return self.gpa_space.view(gpa, n)

    def translate(self, cr3: int, gva: int) -> int:
        return translate(self.gpa_space.read, cr3, gva)

    # ------------------------------------------------------------------ virtual processors
    def create_vp(self, index: int | None = None) -> VirtualProcessor:
        """A new VP with KVM's supported CPUID (APIC ID = index)."""
        if index is None:
            index = len(self.vps)
        if index in self.vps:
            raise ValueError(f"VP {index} already exists in partition {self.name!r}")
        if not 0 <= index < 1024:
            raise ValueError(f"VP index {index} is out of range 0-1023")
        vcpu = self.vm.create_vcpu(index)
        cpuid = type(self.cpuid).from_buffer_copy(self.cpuid)
        for i in range(cpuid.nent):
            e = cpuid.entries[i]
            if e.function == 1:
                e.ebx = (e.ebx & 0x00FFFFFF) | (index << 24)
            elif e.function in (0xB, 0x1F):
                e.edx = index
        vcpu.set_cpuid2(cpuid)
        if self.dirty_rings is not None:
            self.dirty_rings.add_vcpu(vcpu)
        vp = VirtualProcessor(self, vcpu)
        control, dr = self.intercepts.guest_debug_control()
        if control:
            vcpu.set_guest_debug(control, dr)
        self.vps[index] = vp
        return vp

    def _update_guest_debug(self) -> None:
        for vp in self.vps.values():
            self._apply_guest_debug(vp)

    def _apply_guest_debug(self, vp: VirtualProcessor) -> None:
        control, dr = self.intercepts.guest_debug_control()
        vp.vcpu.set_guest_debug(control, dr)

    def pause(self) -> None:
        # every VP kicked before waiting for any: they park in parallel, not one after another
        for vp in self.vps.values():
            vp.pause(wait=False)
        for vp in self.vps.values():
            vp.pause()

    def resume(self) -> None:
        for vp in self.vps.values():
            vp.resume()

    # ------------------------------------------------------------------ interrupts
    def irq_line(self, pin: int, level: bool) -> None:
        """Drive an IOAPIC/PIC input (GSI `pin`) high or low."""
        if not 0 <= pin < 24:
            raise ValueError(f"IRQ pin {pin} is out of range 0-23")
        self.vm.irq_line(pin, 1 if level else 0)

    def pulse_irq(self, pin: int) -> None:
        """An edge on `pin`: raise then lower it."""
        self.irq_line(pin, True)
        self.irq_line(pin, False)

    def signal_msi(self, address: int, data: int) -> None:
        self.vm.signal_msi(address, data)

    def interrupt(self, vp_index: int, vector: int) -> None:
        """A fixed, edge-triggered interrupt `vector` to one VP's LAPIC (as an MSI)."""
        if vp_index not in self.vps:
            raise ValueError(f"no VP {vp_index} in partition {self.name!r}")
        if not 16 <= vector <= 255:
            raise ValueError(f"interrupt vector {vector} is out of range 16-255")
        self.vm.signal_msi(LAPIC_MSI_BASE | (vp_index << 12), vector)

    def irqfd(self, gsi: int) -> int:
        """An eventfd whose signal raises GSI `gsi` (IOAPIC pin for 0-23) without a syscall to us."""
        fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            self.vm.irqfd(fd, gsi)
        except BaseException:
            os.close(fd)
            raise
        self._eventfds.append(fd)
        return fd

    def msi_irqfd(self, vp_index: int, vector: int) -> int:
        """An eventfd whose signal delivers `vector` to VP `vp_index` (an MSI route on a GSI of
        its own), without a syscall to us: for device models that interrupt the guest often."""
        if vp_index not in self.vps:
            raise ValueError(f"no VP {vp_index} in partition {self.name!r}")
        if not 16 <= vector <= 255:
            raise ValueError(f"interrupt vector {vector} is out of range 16-255")
        with self._lock:
            gsi = IOAPIC_PINS + len(self._msi_routes)
            self._msi_routes.append((LAPIC_MSI_BASE | (vp_index << 12), vector))
            self.vm.set_gsi_routing(self._routing_table())
        return self.irqfd(gsi)

    def _routing_table(self) -> list[ks.kvm_irq_routing_entry]:
        """KVM's default routes (GSI n -> IOAPIC pin n, and the 8259s for 0-15), which setting a
        table replaces, plus our MSI routes."""
        entries = []
        for gsi in range(IOAPIC_PINS):
            chips = [(c.IRQCHIP_IOAPIC, gsi)]
            if gsi < 16:
                chips.append(
                    (c.IRQCHIP_PIC_MASTER, gsi) if gsi < 8 else (c.IRQCHIP_PIC_SLAVE, gsi - 8)
                )
            for chip, pin in chips:
                e = ks.kvm_irq_routing_entry(gsi=gsi, type=c.IRQ_ROUTING_IRQCHIP)
                e.u.irqchip.irqchip, e.u.irqchip.pin = chip, pin
                entries.append(e)
        for i, (address, data) in enumerate(self._msi_routes):
            e = ks.kvm_irq_routing_entry(gsi=IOAPIC_PINS + i, type=c.IRQ_ROUTING_MSI)
            e.u.msi.address_lo, e.u.msi.address_hi, e.u.msi.data = (
                address & 0xFFFFFFFF,
                address >> 32,
                data,
            )
            entries.append(e)
        return entries

    def ioeventfd(
        self,
        port_or_gpa: int,
        length: int,
        fd: int | None = None,
        datamatch: int | None = None,
        mmio: bool = False,
    ) -> IoEventFd:
        """Make guest writes of `length` bytes to a port (or GPA if mmio) signal an eventfd."""
        if length not in (0, 1, 2, 4, 8) or (not mmio and length == 8):
            raise ValueError(f"ioeventfd length {length} must be 1, 2, 4 (or 8 for MMIO, 0 = any)")
        if not mmio and not 0 <= port_or_gpa <= 0xFFFF:
            raise ValueError(f"port {port_or_gpa:#x} is out of range 0-0xffff")
        if fd is None:
            fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._eventfds.append(fd)
        self.vm.ioeventfd(port_or_gpa, length, fd, datamatch, pio=not mmio)
        return IoEventFd(port_or_gpa, length, fd, datamatch, mmio, self)

    # ------------------------------------------------------------------ state
    def save(self, *, memory: bool = False) -> PartitionState:
        """Every VP's state, irqchips, clock, RAM layout and intercept counters (the contents
        of RAM too with `memory`). The VPs must be paused or stopped."""
        from pyhv.hypervisor.state import save_partition  # not on the boot path

        return save_partition(self, memory=memory)

    def check(self, state: PartitionState) -> None:
        """StateError naming the value if `state` does not fit this partition."""
        from pyhv.hypervisor.state import check

        check(self, state)

    def restore(self, state: PartitionState, *, checked: bool = False) -> None:
        """Take `state` into this partition (the same RAM regions and VPs, not running); a
        state that does not fit raises StateError and changes nothing. `checked`: check()
        passed on this very state just before (the caller's word; not checked again)."""
        from pyhv.hypervisor.state import restore_into

        restore_into(self, state, checked=checked)

    @classmethod
    def from_state(cls, state: PartitionState, name: str | None = None) -> Partition:
        """A new partition holding `state` (saved with memory); its VPs are created, not started."""
        from pyhv.hypervisor.state import fill_new

        p = cls(name or state.name, irqchip=state.irqchip)
        try:
            fill_new(p, state)
        except BaseException:
            p.close()
            raise
        return p

    # ------------------------------------------------------------------ counters
    @property
    def counters(self) -> dict[str, dict[str, Any]]:
        """Per intercept kind: count, handled by default, handler errors, total handler seconds."""
        out: dict[str, dict[str, Any]] = {}
        for kind in InterceptKind:
            k = int(kind)
            count = sum(vp.counts[k] for vp in self.vps.values())
            defaulted = sum(vp.defaults[k] for vp in self.vps.values())
            out[kind.name.lower()] = {
                "count": count,
                "defaulted": defaulted,
                "errors": sum(vp.errors[k] for vp in self.vps.values()),
                "handler_seconds": sum(vp.handler_ns[k] for vp in self.vps.values()) / 1e9,
            }
        return out

    # ------------------------------------------------------------------ life cycle
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for vp in self.vps.values():
            if vp.state is not VpState.IDLE:
                try:
                    vp.stop()
                except TimeoutError:
                    pass
        if self.dirty_rings is not None:
            self.dirty_rings.close()
        for vp in self.vps.values():
            vp.vcpu.close()
        try:
            self.gpa_space.close()
        except KvmError:
            pass
        for fd in self._eventfds:
            os.close(fd)
        self.vm.close()
        self.kvm.close()
