"""A VM's state as a migration source sends it, without a VM: one VP, Dynamic Memory on with
its channel open (tests/migration/test_state.py, the fuzz campaign's seed)."""

from __future__ import annotations

from pyhv.devices.uart16550 import Uart16550
from pyhv.dynmem.vsp import VSP_STATE_VERSION, DmVspState, GuestCaps
from pyhv.hypervisor.state import STATE_VERSION as PARTITION_STATE_VERSION
from pyhv.hypervisor.state import PartitionState, RegionSavedState, VpSavedState
from pyhv.memory.ranges import PageRange
from pyhv.migration.state import STATE_VERSION, VmState
from pyhv.vmbus.channel import SavedChannel
from pyhv.vmbus.controller import ControllerState
from pyhv.worker.dynmem import DynamicMemoryState


def vm_state(version: int = STATE_VERSION) -> VmState:
    vp = VpSavedState(0, b"r" * 144, b"s" * 312, b"x" * 4096, b"c" * 392, {0x10: 5, 0xC0000080: 0xD01},
                      b"e" * 64, 0, b"l" * 1024, b"d" * 128)  # fmt: skip
    part = PartitionState(
        PARTITION_STATE_VERSION, "vm", True, (RegionSavedState(0, 1 << 20, False, True),), (vp,),
        (b"\x01" * 520,) * 3, b"\x02" * 48,
        {0: {"counts": [1, 2], "defaults": [0, 0], "errors": [0, 0], "handler_ns": [5, 6]}},
    )  # fmt: skip
    channel = ControllerState(
        1, 0, 16, 0x8000, 8, 4, 0x40, 0, (SavedChannel(1, 0x8000, 8, 4, 0x40),)
    )
    vsp = DmVspState(VSP_STATE_VERSION, "IDLE", 0x20000, GuestCaps(True, True, 128, 0, 1 << 20), False, 9, None,
                     (PageRange(0, 256),), (PageRange(16, 4),), {"accepted": 3})  # fmt: skip
    dm = DynamicMemoryState(1, channel, vsp, {"ballooned_pages": 4})
    return VmState(version, part, Uart16550(lambda b: None).save(), dm)
