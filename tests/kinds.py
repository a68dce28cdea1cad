"""The four kinds of test, and the trace that proves a test ran guest code (see tests/conftest.py).

A test's kind is the closest of its markers among KINDS (see `kinds_of`). The proof reads the
directory named by PYHV_GUEST_RAN_DIR: pyhv writes `<pid>-<tid>-<ns>` there each time a VP thread
starts its run loop (pyhv.hypervisor.guest_ran); `qemu_guest_ran` writes `qemu-<pid>` for a
QEMU guest seen running under KVM.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyhv.hypervisor.guest_ran import ENV

KINDS = ("guest", "kvm", "unit", "simulation")
NEED_KVM = frozenset({"guest", "kvm"})
KVM_DEBUGFS = Path("/sys/kernel/debug/kvm")


def kinds_of(item: pytest.Item) -> set[str]:
    """The kind markers of the closest node that has any: the test's own (a decorator or a
    parameter's marks), else its class's, else its module's `pytestmark`. One is right; none,
    or two on the same node, is a mistake. So a module of `guest` tests marks its one test that
    runs no guest code `kvm` above that test alone."""
    for node in reversed(item.listchain()):
        found = {m.name for m in node.own_markers if m.name in KINDS}
        if found:
            return found
    return set()


class GuestTrace:
    """The records in the directory: `since(before)` names those that appeared after `before`."""

    def __init__(self, where: Path) -> None:
        self.where = where

    def snapshot(self) -> set[str]:
        return set(os.listdir(self.where))

    def since(self, before: set[str]) -> list[str]:
        return sorted(self.snapshot() - before)

    def describe(self, records: list[str]) -> str:
        out = []
        for r in records:
            try:
                out.append(f"{r} ({(self.where / r).read_text().strip()})")
            except OSError:
                out.append(r)
        return ", ".join(out)


def qemu_guest_ran(pid: int, output: bytes) -> None:
    """Record that the QEMU process `pid` runs its guest under KVM: KVM's debugfs lists a VM of
    that process (so QEMU did not fall back to its emulator) and the guest printed `output` on
    its serial port (only guest code writes there). Call it once the guest's output came."""
    vms = [d.name for d in KVM_DEBUGFS.glob(f"{pid}-*")] if KVM_DEBUGFS.is_dir() else []
    assert KVM_DEBUGFS.is_dir(), (
        f"{KVM_DEBUGFS} is missing, so QEMU's use of KVM cannot be checked: "
        "mount -t debugfs none /sys/kernel/debug (as root)"
    )
    assert vms, f"QEMU (pid {pid}) has no KVM VM in {KVM_DEBUGFS}: it does not run under KVM"
    assert output, "the guest printed nothing: no proof that its code ran"
    where = os.environ.get(ENV)
    if where:
        line = output.splitlines()[0][:80].decode(errors="replace")
        (Path(where) / f"qemu-{pid}").write_text(f"QEMU KVM VM {vms[0]} printed {line!r}\n")
