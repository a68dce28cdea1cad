"""The VM worker's core (the book's VMWP, in-process form): assemble a partition from a
validated VmConfig, load the guest by direct boot, wire the platform devices to I/O
intercepts, run the VPs, and report how the VM ended.

Devices see only their registers and callbacks; this module is the only place that knows both
the devices and the hypervisor's intercept messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from pyhv.devices.poweroff import POWEROFF_PORT, PowerOff
from pyhv.devices.uart16550 import COM1_BASE, COM1_IRQ, Uart16550
from pyhv.trace.recorder import Recorder
from pyhv.worker import boot, loaders
from pyhv.worker.config import VmConfig
from pyhv.worker.console import SerialLog
from pyhv.worker.outcome import (
    EMULATION_ERROR,
    POWEROFF,
    STOPPED,
    TRIPLE_FAULT,
    WORKER_ERROR,
    VmEnd,
)

if TYPE_CHECKING:
    from pyhv.dynmem.status import MemoryStatus
    from pyhv.hypervisor import Partition, VirtualProcessor, VpEvent
    from pyhv.memory.hugeram import HugeRam
    from pyhv.memory.manager import MemoryManager
    from pyhv.memory.smartpaging import SmartPagingFile
    from pyhv.worker.dynmem import DynamicMemoryService
    from pyhv.worker.storage import StorageService


class EarlyIncoming(Protocol):
    """A live migration's destination that takes pages as soon as the VM's RAM exists."""

    def ram_ready(self, vm: VirtualMachine) -> None: ...

    def abandon(self, error: BaseException) -> None: ...


class VirtualMachine:
    """One running VM: ``start()``, ``send()`` serial input, ``wait()`` for its end, ``close()``.

    ``output`` receives the guest's serial output as it is written (on a VP thread: keep it
    quick); all of it is also kept in ``serial`` for expect-style reading.
    """

    def __init__(
        self,
        config: VmConfig,
        output: Callable[[bytes], None] | None = None,
        *,
        on_memory_status: Callable[[MemoryStatus], object] | None = None,
        memory_manager: MemoryManager | None = None,
        smart_paging: SmartPagingFile | None = None,
        huge_ram: HugeRam | None = None,
    ) -> None:
        self.config = config
        #: The Smart Paging file its owner passed (pyhv.worker.smartpaging), for start().
        self.smart_paging = smart_paging
        #: Dynamic Memory (VMBus controller, DM VSP, memory manager entry) when configured.
        self.dynmem: DynamicMemoryService | None = None
        #: The page file's disk on VMBus (synthetic storage) when `page_file_size` is set.
        self.storage: StorageService | None = None
        self._on_memory_status = on_memory_status
        self._memory_manager = memory_manager
        self.serial = SerialLog()
        self._output = output
        self.partition: Partition | None = None
        self.vps: list[VirtualProcessor] = []
        self.image: boot.Image | None = None
        self.uart = Uart16550(self._serial_out, self._pulse_com1)
        self.poweroff = PowerOff(self._powered_off)
        self._end: VmEnd | None = None
        self._end_lock = threading.Lock()
        self._ended = threading.Event()
        self._watchers: list[threading.Thread] = []
        #: time.monotonic() when the first VP started (live migration measures downtime to it)
        self.running_since: float | None = None
        #: The flight recorder: its event sources are on only while someone subscribes, and
        #: only those of `trace_kinds` (None: all; see set_trace_kinds).
        self.recorder = Recorder(on_active=self._trace_sources)
        self.trace_kinds: frozenset[str] | None = None
        #: The private tmpfs of `huge_pages` RAM: its owner's (a jailed worker's VMMS mounts it),
        #: or mounted at start().
        self._huge_ram = huge_ram

    # --- life cycle -----------------------------------------------------------------

    def start(
        self,
        incoming: Callable[[VirtualMachine], None] | None = None,
        early: EarlyIncoming | None = None,
    ) -> None:
        """Create the partition, boot-load the image and start every VP. With `incoming`
        (live migration's destination) nothing is loaded: `incoming(vm)` fills RAM and sets
        the VPs' and devices' state once they exist, before the VPs start; with `early` too,
        `early.ram_ready(vm)` as soon as the RAM exists (pages may arrive from there on), and
        `early.abandon(error)` before that RAM goes if the rest cannot be built."""
        from pyhv.hypervisor import Partition  # lazy: keeps `pyhv --help` fast

        cfg = self.config
        size = cfg.image.stat().st_size
        if size > cfg.memory:
            raise boot.ImageError(
                f"{cfg.image.name} is {size} bytes, more than the VM's {cfg.memory} bytes of RAM: "
                "it cannot be a guest image for this VM"
            )
        image_bytes = cfg.image.read_bytes()
        p = Partition(name=cfg.name, dirty_ring_entries=cfg.dirty_ring_entries)
        self.partition = p
        try:
            if cfg.huge_pages:
                from pyhv.memory.hugeram import HUGE_PAGE, HugeRam
                from pyhv.worker.config import MAX_MEMORY

                # the largest RAM any VM may reach (its maximum may be raised while it runs):
                # the memory manager, not the tmpfs, keeps the books
                if self._huge_ram is None:
                    self._huge_ram = HugeRam(MAX_MEMORY + HUGE_PAGE)
                p.gpa_space.new_ram_file = self._huge_ram.new_file
            from pyhv.memory.smartpaging import SmartPagingRefused
            from pyhv.worker.smartpaging import map_ram

            if self.smart_paging is not None and not cfg.dynamic_memory:
                raise SmartPagingRefused(
                    f"VM {cfg.name!r} was given a Smart Paging file without Dynamic Memory: "
                    "only Dynamic Memory can end Smart Paging"
                )
            if incoming is None or cfg.dynamic_memory or self.smart_paging is not None:
                early = None  # Dynamic Memory maps its hot-added RAM once its service exists
            if early is not None:
                # the source's pages land in the mapped RAM first; KVM's slots (~3 ms per GiB)
                # while they come, before any VP exists
                paged = None
                for gpa, size in boot.ram_regions(cfg.memory):
                    p.add_memory(gpa, size, register=False)
                early.ram_ready(self)
                p.register_memory()
            else:
                paged = map_ram(p, boot.ram_regions(cfg.memory), self.smart_paging)
            entry = None
            if incoming is None:  # a migrated VM's RAM comes from its source instead
                self.image, entry = loaders.prepare(
                    p,
                    image_bytes,
                    memory=cfg.memory,
                    vp_count=cfg.vps,
                    cmdline=cfg.cmdline,
                    flags=boot.FLAG_DYNAMIC_MEMORY if cfg.dynamic_memory else 0,
                    name=cfg.image.name,
                    path=str(cfg.image),
                )
            p.intercepts.install_io(COM1_BASE, COM1_BASE + 7, self._com1_io)
            p.intercepts.install_io(POWEROFF_PORT, POWEROFF_PORT, self._poweroff_io)
            if cfg.dynamic_memory:
                from pyhv.worker.dynmem import DynamicMemoryService

                self.dynmem = DynamicMemoryService(
                    p,
                    cfg,
                    on_status=self._on_memory_status,
                    memory_manager=self._memory_manager,
                    smart_paging=paged,
                )
                if cfg.page_file_size:
                    from pyhv.worker.storage import StorageService

                    self.storage = StorageService(p, cfg, self.dynmem)
                self.dynmem.start()
            self._trace_sources(self.recorder.active)  # a subscriber may have come first
            self.vps = [p.create_vp(i) for i in range(cfg.vps)]
            if incoming is not None:
                # The VP threads (and their watchers) exist before the pause at the source,
                # parked: incoming() restores into them and run_incoming() only wakes them.
                for vp in self.vps:
                    vp.start(paused=True)
                    self._watch_vp(vp)
                incoming(self)
                if self.running_since is None:  # a hook that did not resume them itself
                    self.run_incoming()
                return
            if entry is not None:
                _set_entry_state(self.vps[0], entry)
            for vp in self.vps:
                vp.start()
                if self.running_since is None:
                    self.running_since = time.monotonic()  # a VP runs guest code from here
                self._watch_vp(vp)
        except BaseException as e:
            if early is not None:  # its pages stop arriving before their RAM goes
                early.abandon(e)
            self.close()
            raise

    def _watch_vp(self, vp: VirtualProcessor) -> None:
        w = threading.Thread(target=self._watch, args=(vp,), name=f"watch-vp{vp.index}")
        w.daemon = True
        w.start()
        self._watchers.append(w)

    def run_incoming(self) -> None:
        """A migrated VM's parked VPs run guest code from now (its state restored)."""
        assert self.partition is not None
        self.running_since = time.monotonic()
        self.partition.resume()

    def set_trace_kinds(self, kinds: frozenset[str] | None) -> None:
        """Which event sources the recorder turns on (pyhv.trace.events KINDS; None: all):
        `pyhv vm trace --only dm` then leaves every intercept handler plain."""
        self.trace_kinds = kinds
        self._trace_sources(self.recorder.active)

    def _trace_sources(self, on: bool) -> None:
        """Turn the flight recorder's event sources on (the first subscriber came) or off
        (the last one left): intercept handlers swapped for traced ones, the VSPs' tracer."""
        from pyhv.hypervisor.intercepts import InterceptKind

        kinds = self.trace_kinds
        wanted = {
            "io": InterceptKind.IO_PORT,
            "mmio": InterceptKind.MEMORY,
            "msr": InterceptKind.MSR,
        }
        intercepts = [k for name, k in wanted.items() if kinds is None or name in kinds]
        record = self.recorder.record if on else None
        if self.partition is not None:
            self.partition.intercepts.set_tracer(record if intercepts else None, intercepts)
        if self.dynmem is not None:
            vsp_on = kinds is None or bool({"dm", "vmbus"} & kinds)
            self.dynmem.vsp.tracer = record if vsp_on else None
        if self.storage is not None:
            self.storage.vsp.tracer = record if kinds is None or "vmbus" in kinds else None

    def send(self, data: bytes) -> None:
        """Serial input: bytes the guest receives on COM1."""
        self.uart.feed(data)

    def stop(self, why: str = "stopped by the user") -> None:
        """End the VM (its owner's decision); wait() reports it as stopped."""
        self._finish(VmEnd(STOPPED, detail=why))

    def wait(self, timeout: float | None = None) -> VmEnd | None:
        """How the VM ended, or None while it still runs after ``timeout`` seconds."""
        if not self._ended.wait(timeout):
            return None
        return self._end

    @property
    def end(self) -> VmEnd | None:
        return self._end

    def close(self) -> None:
        """Stop the VPs and release the partition (its memory goes back to the host)."""
        if self._end is None:
            self._finish(VmEnd(STOPPED, detail="closed"))
        # Let the stopping thread finish with the VPs before their vCPUs go away.
        self._ended.wait(10)
        for vp in self.vps:
            _quietly(vp.stop)
        if self.dynmem is not None:
            _quietly(self.dynmem.close)
        if self.storage is not None:
            _quietly(self.storage.close)
        if self.partition is not None:
            _quietly(self.partition.close)
        if self._huge_ram is not None:
            self._huge_ram.close()
        self.serial.close()

    def host_resident_bytes(self) -> int:
        """Host memory behind the guest's RAM right now (resident pages of its memfds)."""
        from pyhv.worker.hostmem import resident_bytes

        if self.partition is None:
            return 0
        return sum(resident_bytes(r.host_address, r.size) for r in self.partition.regions)

    # --- Dynamic Memory (the VMMS's and the operator's calls) ------------------------------

    def _dm(self, what: str) -> DynamicMemoryService:
        if self.dynmem is None:
            from pyhv.worker.dynmem import DynamicMemoryError

            raise DynamicMemoryError(
                f"{what}: VM {self.config.name!r} was not configured with Dynamic Memory "
                "(start it with dynamic_memory=True / --dynamic-memory)"
            )
        return self.dynmem

    def memory_status(self) -> dict[str, Any]:
        """Visible, assigned, ballooned and hot-added pages, the guest's last status report
        (committed, available, time), the VSP's state and its counts of bad messages."""
        return self._dm("memory status").status()

    def set_memory_target(self, target_bytes: int) -> dict[str, Any]:
        """Balloon, or unballoon then hot-add, towards `target_bytes` (clamped to the
        configured minimum and maximum); returns the plan at once."""
        return self._dm("memory target").set_target(target_bytes)

    def set_memory_limits(self, minimum: int, maximum: int) -> dict[str, Any]:
        """Change the Dynamic Memory range while the VM runs (bytes): the minimum may only go
        down, the maximum only up; later targets are clamped to the new range, and the guest is
        told the new maximum (hot-add up to it)."""
        from pyhv.worker.config import ConfigError
        from pyhv.worker.dynmem import DynamicMemoryError

        dm = self._dm("memory limits")
        try:  # the range a VM may boot with (a migration's destination re-validates it)
            config = VmConfig.from_dict(
                self.config.to_dict() | {"minimum": minimum, "maximum": maximum}
            )
        except (ConfigError, TypeError) as e:
            raise DynamicMemoryError(f"memory limits: {e}") from None
        result = dm.set_limits(minimum, maximum)
        self.config = config
        return result

    def end_smart_paging(self) -> dict[str, Any]:
        """Move the Smart Paging range into host memory (VPs paused briefly); the owner deletes
        the file once this returns."""
        return self._dm("end Smart Paging").end_smart_paging()

    def add_memory(self, pages: int) -> dict[str, Any]:
        """The balancer's add: unballoon first, then hot-add the rest."""
        return self._dm("add memory").add(pages)

    def remove_memory(self, pages: int) -> dict[str, Any]:
        """The balancer's remove: balloon `pages` out of the guest."""
        return self._dm("remove memory").remove(pages)

    def hot_remove_memory(self, pages: int | None = None) -> dict[str, Any]:
        """Ask the guest to give `pages` back offline (DM hot-remove; default: all its hot-added
        memory), never below the minimum; Guest Visible Physical Memory falls."""
        return self._dm("hot-remove").hot_remove(pages)

    def wait_memory_idle(self, timeout: float | None = None) -> bool:
        """Wait until the last target/add/remove is done (or given up: see `last_error`)."""
        return self._dm("wait").wait_idle(timeout)

    def __enter__(self) -> VirtualMachine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- endings ----------------------------------------------------------------------

    def _finish(self, end: VmEnd) -> None:
        """Record the first ending; stop every VP from a thread of our own (a VP thread
        must not wait for itself)."""
        with self._end_lock:
            if self._end is not None:
                return
            self._end = end
        threading.Thread(target=self._stop_vps, name="vm-stop", daemon=True).start()

    def _stop_vps(self) -> None:
        for vp in self.vps:
            _quietly(vp.stop)
        self.serial.close()
        self._ended.set()

    def _watch(self, vp: VirtualProcessor) -> None:
        """Turn a VP's end (shutdown, emulation failure, stop) into the VM's end."""
        try:
            event = vp.wait()
        except Exception as e:  # noqa: BLE001 - reported as the VM's end
            self._finish(VmEnd(WORKER_ERROR, vp=vp.index, detail=f"{type(e).__name__}: {e}"))
            return
        self._finish(_end_from_event(vp, event))

    # --- devices ----------------------------------------------------------------------

    def _serial_out(self, data: bytes) -> None:
        self.serial.append(data)
        if self._output is not None:
            self._output(data)

    def _pulse_com1(self) -> None:
        if self.partition is not None:
            self.partition.pulse_irq(COM1_IRQ)

    def _powered_off(self, status: int) -> None:
        self._finish(VmEnd(POWEROFF, status=status))

    def _com1_io(self, msg: Any) -> int | bytes | None:
        offset = msg.port - COM1_BASE
        size = msg.access_size
        if msg.is_write:
            data = msg.data if msg.count > 1 else None
            if data:
                for i in range(0, len(data) - size + 1, size):
                    self.uart.io_write(offset, size, int.from_bytes(data[i : i + size], "little"))
            else:
                self.uart.io_write(offset, size, msg.value)
            return None
        if msg.count > 1:
            # REP INS: KVM bounds count x size by its I/O page (4 KiB).
            return b"".join(
                self.uart.io_read(offset, size).to_bytes(size, "little") for _ in range(msg.count)
            )
        return self.uart.io_read(offset, size)

    def _poweroff_io(self, msg: Any) -> int | None:
        if msg.is_write:
            self.poweroff.io_write(msg.access_size, msg.value)
            return None
        return self.poweroff.io_read(msg.access_size)


def _set_entry_state(vp: VirtualProcessor, entry: boot.EntryState) -> None:
    from pyhv.hypervisor.registers import DescriptorTable, Registers, Segment

    sregs = vp.special_registers
    for name in ("cs", "ds", "es", "ss", "fs", "gs", "tr"):
        seg: boot.Segmentation | None = getattr(entry, name)
        if seg is None:
            continue  # TR: left at its reset state
        setattr(
            sregs,
            name,
            Segment(
                base=seg.base,
                limit=seg.limit,
                selector=seg.selector,
                type=seg.type,
                present=seg.present,
                dpl=seg.dpl,
                db=seg.db,
                s=seg.s,
                l=seg.l,
                g=seg.g,
                unusable=seg.unusable,
            ),
        )
    sregs.gdt = DescriptorTable(entry.gdt_base, entry.gdt_limit)
    sregs.idt = DescriptorTable(entry.idt_base, entry.idt_limit)
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = entry.cr0, entry.cr3, entry.cr4, entry.efer
    vp.special_registers = sregs
    vp.registers = Registers(
        rip=entry.rip,
        rsp=entry.rsp,
        rsi=entry.rsi,
        rax=entry.rax,
        rbx=entry.rbx,
        rflags=entry.rflags,
    )


def _end_from_event(vp: VirtualProcessor, event: VpEvent | None) -> VmEnd:
    from pyhv.hypervisor import VpEventKind

    if event is None:
        return VmEnd(WORKER_ERROR, vp=vp.index, detail="the VP thread ended without an event")
    regs = _register_dump(event)
    if event.kind is VpEventKind.SHUTDOWN:
        return VmEnd(TRIPLE_FAULT, vp=vp.index, registers=regs, detail=event.detail)
    if event.kind is VpEventKind.STOPPED:
        return VmEnd(STOPPED, vp=vp.index, detail=event.detail)
    if event.kind is VpEventKind.HALT:
        # HLT reaches user space only if the in-kernel LAPIC cannot wake the VP: interrupts off.
        return VmEnd(
            EMULATION_ERROR,
            vp=vp.index,
            registers=regs,
            detail="the VP halted with interrupts disabled (it can never wake)",
        )
    if event.error is not None and not isinstance(event.error, OSError):
        return VmEnd(WORKER_ERROR, vp=vp.index, registers=regs, detail=event.detail)
    detail = event.detail
    suberror = getattr(event.exit, "suberror", None)
    if suberror in _INTERNAL_ERRORS:
        detail = f"{_INTERNAL_ERRORS[suberror]} ({detail})"
    return VmEnd(EMULATION_ERROR, vp=vp.index, registers=regs, detail=detail)


# KVM_INTERNAL_ERROR_* suberrors (include/uapi/linux/kvm.h), said in words.
_INTERNAL_ERRORS = {
    1: "the instruction emulator failed (e.g. code fetched from a GPA without RAM, or an "
    "instruction it cannot emulate)",
    2: "an exception occurred while delivering another one",
    3: "an event could not be delivered",
    4: "an unexpected exit reason",
}


def _register_dump(event: VpEvent) -> dict[str, int]:
    out: dict[str, int] = {}
    r, s = event.registers, event.special_registers
    if r is not None:
        out.update({n: getattr(r, n) for n in r.__slots__})
    if s is not None:
        out.update(cr0=s.cr0, cr2=s.cr2, cr3=s.cr3, cr4=s.cr4, efer=s.efer)
        out.update(cs=s.cs.selector, ss=s.ss.selector)
    return out


def _quietly(fn: Callable[[], object]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - tearing down: the first error was already reported
        pass
