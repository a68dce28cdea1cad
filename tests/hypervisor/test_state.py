"""The whole state of a running guest, saved and restored into a fresh partition in another
process: the guest goes on where it was."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from pyhv.hypervisor import StateError
from pyhv.kvm import constants as c
from tests.guests.harness import guest
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

ROOT = Path(__file__).resolve().parents[2]
XMM0_MAGIC = bytes.fromhex("0df0adbaefbeadde1122334455667788")


def test_a_running_guest_saved_here_goes_on_in_a_fresh_partition_in_another_process(
    tmp_path: Path,
) -> None:
    with guest("counter_user", cpl=3) as (p, vp, img):
        # xmm0 is set through XSAVE; XSTATE_BV must say SSE state is present or it is dropped
        area = bytearray(vp.vcpu.get_xsave())
        area[160:176] = XMM0_MAGIC
        bv = struct.unpack_from("<Q", area, c.XSAVE_XSTATE_BV_OFFSET)[0] | 0b11
        struct.pack_into("<Q", area, c.XSAVE_XSTATE_BV_OFFSET, bv)
        vp.vcpu.set_xsave(bytes(area))
        vp.start()
        wait_for(
            lambda: int.from_bytes(p.read(img["counter"], 8), "little") >= 1000,
            5,
            "the guest counting to 1000",
            interval=0.002,
        )
        with pytest.raises(StateError, match="pause\\(\\) them"):
            p.save(memory=True)
        vp.pause()
        state = p.save(memory=True)
        saved_rbx = vp.registers.rbx
    path = tmp_path / "state.pickle"
    path.write_bytes(pickle.dumps(state))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.hypervisor.restore_child",
            str(path),
            hex(img["counter"]),
            hex(img["xmm_seen"]),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    r = json.loads(out.splitlines()[-1])
    assert r["regs_equal"] is True
    assert r["xmm0_restored"] == XMM0_MAGIC.hex()
    assert r["cpl"] == 3
    # the counter went on from where it was saved, not from 0
    assert r["counter_at_start"] in (saved_rbx, saved_rbx - 1)
    assert r["counter"] > r["counter_at_start"] + 100_000
    assert r["rbx"] >= r["counter"]
    assert r["xmm_seen"] == int.from_bytes(XMM0_MAGIC[:8], "little")
