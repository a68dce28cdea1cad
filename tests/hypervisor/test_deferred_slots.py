"""RAM added with register=False (a migration's destination takes pages before KVM's slots
exist): mapped at once, in KVM's slots only after register_memory(), removable either way."""

from __future__ import annotations

import pytest

from pyhv.hypervisor import Partition
from pyhv.kvm.fds import KvmError

pytestmark = pytest.mark.kvm


def test_a_region_added_unregistered_is_written_first_and_reaches_kvm_when_registered() -> None:
    with Partition("deferred") as p:
        r = p.add_memory(0, 1 << 20, track_dirty=True, register=False)
        assert not r.registered
        r.mm[0:4] = b"page"  # the mapping is there before the slot
        with pytest.raises(KvmError, match="KVM_GET_DIRTY_LOG"):
            r.dirty_bitmap()  # KVM knows no such slot yet
        p.register_memory()
        p.register_memory()  # once only
        assert r.registered
        assert len(r.dirty_bitmap()) == (1 << 20) // 4096 // 8  # KVM's slot now
        assert p.read(0, 4) == b"page"
        gone = p.add_memory(2 << 20, 1 << 20, register=False)
        p.remove_memory(gone)  # never in a slot: nothing to take out of KVM
        assert [x.gpa for x in p.regions] == [0]
