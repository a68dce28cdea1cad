"""Child process of test_state: restore a saved partition, run it, report as one JSON line.

usage: python -m tests.hypervisor.restore_child STATE.pickle COUNTER_GPA XMM_SEEN_GPA
"""

from __future__ import annotations

import json
import pickle
import sys

from pyhv.hypervisor import Partition, Registers
from pyhv.kvm import structs
from tests.support.wait import wait_for


def main() -> None:
    path, counter_gpa, xmm_gpa = sys.argv[1], int(sys.argv[2], 0), int(sys.argv[3], 0)
    with open(path, "rb") as f:
        state = pickle.load(f)
    with Partition.from_state(state, name="restored") as p:
        vp = p.vps[0]
        saved = Registers.from_kvm(structs.kvm_regs.from_buffer_copy(state.vps[0].regs))
        regs_equal = vp.registers == saved
        xmm0_restored = vp.vcpu.get_xsave()[160:176].hex()
        start = int.from_bytes(p.read(counter_gpa, 8), "little")
        vp.start()
        wait_for(
            lambda: int.from_bytes(p.read(counter_gpa, 8), "little") > start + 100_000,
            5,
            "the guest counting 100000 steps",
            interval=0.005,
        )
        vp.pause()
        print(
            json.dumps(
                {
                    "regs_equal": regs_equal,
                    "xmm0_restored": xmm0_restored,
                    "counter_at_start": start,
                    "counter": int.from_bytes(p.read(counter_gpa, 8), "little"),
                    "rbx": vp.registers.rbx,
                    "xmm_seen": int.from_bytes(p.read(xmm_gpa, 8), "little"),
                    "cpl": vp.special_registers.cs.dpl,
                }
            )
        )


if __name__ == "__main__":
    main()
