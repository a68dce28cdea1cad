"""The VM state that goes with the last dirty pages: a versioned, explicit structure made of
the components' own states.

The partition's (every VP's KVM state, the IRQCHIPs and clock, the RAM layout, the intercept
counters: pyhv.hypervisor.state), the serial device's (pyhv.devices.uart16550), and the Dynamic
Memory channel's and VSP's when the VM has it (pyhv.worker.dynmem), and the storage VSP's (the
page file's written blocks: pyhv.storage.vsp) when it has a page file. Each component saves and
restores itself and checks what it is given; this module only puts them in one frame, encoded
as JSON with hex for binary fields (no pickle on a network stream). The frame's envelope is
declared (:class:`StateFrame`, a msgspec Struct); each component's part is checked by the
component's own versioned ``from_wire``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from pyhv.devices.uart16550 import UartState
from pyhv.hypervisor.state import PartitionState, StateError
from pyhv.migration.stream import MigrationError
from pyhv.storage.disk import DiskError
from pyhv.storage.vsp import StorageVspState
from pyhv.worker.dynmem import DynamicMemoryState

if TYPE_CHECKING:
    from pyhv.worker.vm import VirtualMachine

STATE_VERSION = 3  # 3: the components' wire forms written by msgspec (bytes as base64)


class StateFrame(msgspec.Struct, forbid_unknown_fields=True):
    """The STATE frame's body: the version and each component's wire form."""

    version: int
    partition: dict[str, Any]
    uart: dict[str, Any]
    dynmem: dict[str, Any] | None = None
    storage: dict[str, Any] | None = None


@dataclass(frozen=True)
class VmState:
    version: int
    partition: PartitionState
    uart: UartState
    dynmem: DynamicMemoryState | None = None
    storage: StorageVspState | None = None

    def encode(self) -> bytes:
        return msgspec.json.encode(
            StateFrame(
                self.version,
                self.partition.to_wire(),
                self.uart.to_wire(),
                None if self.dynmem is None else self.dynmem.to_wire(),
                None if self.storage is None else self.storage.to_wire(),
            )
        )

    @classmethod
    def decode(cls, raw: bytes) -> VmState:
        try:
            d = msgspec.json.decode(raw, type=StateFrame)
        except msgspec.DecodeError as e:
            raise MigrationError(f"the VM state frame is malformed: {e}", "state") from None
        except RecursionError:  # msgspec recurses per nesting level: "[[[[..." of a few KiB
            raise MigrationError(
                "the VM state frame is malformed: JSON nested too deeply", "state"
            ) from None
        if d.version != STATE_VERSION:
            raise MigrationError(
                f"VM state version {d.version!r} is not {STATE_VERSION}: "
                "the hosts run different pyhv releases",
                "state",
            )
        try:
            return cls(
                d.version,
                PartitionState.from_wire(d.partition),
                UartState.from_wire(d.uart),
                None if d.dynmem is None else DynamicMemoryState.from_wire(d.dynmem),
                None if d.storage is None else StorageVspState.from_wire(d.storage),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise MigrationError(f"the VM state frame is malformed: {e}", "state") from None


def prepare(vm: VirtualMachine, *, destination: bool) -> None:
    """Pay the first-use costs of saving (the source) or reading (the destination) a state
    before the pause instead of inside it: the lazy imports, and msgspec's decoder for each
    state type, built on its first use (0.6 ms of the first decode here, 0.04 ms later). The
    destination reads back a state of its own VM, whose VPs are parked (not yet restored)."""
    import pyhv.hypervisor.state  # noqa: F401 - Partition.save imports it on first use

    p = vm.partition
    assert p is not None
    p.kvm.msr_index_list()  # read once and kept (the save's first ioctl otherwise)
    encoded = vm.uart.save().to_wire()
    if not destination:
        msgspec.json.encode(encoded)
        return
    own = VmState.decode(VmState(STATE_VERSION, p.save(), vm.uart.save()).encode())
    # and the restore's own first calls (0.34 ms of the first here, 0.17 later): the parked
    # VPs take back the state they hold, which the source's overwrites in the pause
    mine = dataclasses.replace(own.partition, intercept_counters={})
    try:
        p.check(mine)
        p.restore(mine)
    except StateError as e:
        raise MigrationError(f"the VM built here cannot take a state: {e}", "config") from None


def save(
    vm: VirtualMachine, dynmem: DynamicMemoryState | None, *, hold_serial: bool = False
) -> VmState:
    """Every component's state (the VPs paused; `dynmem` saved with the VSP frozen). With
    `hold_serial`, serial input fed from the moment the UART is saved is held (a migration
    sends it with COMMIT: Uart16550.take_held)."""
    p = vm.partition
    assert p is not None
    try:
        storage = None if vm.storage is None else vm.storage.save()
        uart = vm.uart.save(hold_input=hold_serial)
        return VmState(STATE_VERSION, p.save(), uart, dynmem, storage)
    except (StateError, DiskError) as e:
        raise MigrationError(str(e), "state") from None


def restore(vm: VirtualMachine, st: VmState) -> None:
    """Into the VM built here (RAM in place, VPs created, not started): each component takes
    its own state, after all of them were checked (a refusal changes nothing)."""
    p = vm.partition
    assert p is not None
    if (st.dynmem is None) != (vm.dynmem is None):
        raise MigrationError(
            "the source VM and the one built here differ in Dynamic Memory", "state"
        )
    if (st.storage is None) != (vm.storage is None):
        raise MigrationError(
            "the source VM and the one built here differ in their page file (page_file_size)",
            "state",
        )
    try:
        p.check(st.partition)
        if vm.dynmem is not None and st.dynmem is not None:
            vm.dynmem.check(st.dynmem)
        if vm.storage is not None and st.storage is not None:
            vm.storage.check(st.storage)
        vm.uart.restore(st.uart)
        p.restore(st.partition, checked=True)  # checked above, before anything changed
        if vm.storage is not None and st.storage is not None:
            vm.storage.restore(st.storage)  # before the channel opens again with the DM state
        if vm.dynmem is not None and st.dynmem is not None:
            vm.dynmem.restore(st.dynmem)
    except ValueError as e:  # StateError and the devices' refusals
        raise MigrationError(f"the VM state does not fit the VM built here: {e}", "state") from None
