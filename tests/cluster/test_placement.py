"""Placement chooses a host by memory (startup from the free pool above the reserve, minimums
guaranteed) with affinity and anti-affinity groups; a VM that fits nowhere is told what is
short where."""

from __future__ import annotations

import pytest

from pyhv.cluster.placement import HostSpace, NoPlacement, VmDemand, place

pytestmark = pytest.mark.unit

G = 1 << 30
M = 1 << 20


def test_the_host_with_most_free_memory_after_the_start_wins() -> None:
    hosts = [HostSpace("a", 8 * G, 2 * G, 0), HostSpace("b", 8 * G, 3 * G, 0)]
    assert place(VmDemand("v", 1 * G, 512 * M), hosts).name == "b"
    # Ties go by name.
    assert (
        place(VmDemand("v", 1 * G, 512 * M), [hosts[1], HostSpace("a", 8 * G, 3 * G, 0)]).name
        == "a"
    )


def test_minimums_must_stay_guaranteed() -> None:
    full = HostSpace("a", 4 * G, 3 * G, minimums=3900 * M)
    roomy = HostSpace("b", 4 * G, 1 * G, minimums=0)
    assert place(VmDemand("v", 512 * M, 256 * M), [full, roomy]).name == "b"


def test_affinity_and_anti_affinity_groups() -> None:
    a = HostSpace("a", 8 * G, 4 * G, 0, {"db": ("db1",), "web": ("web1",)})
    b = HostSpace("b", 8 * G, 6 * G, 0)
    assert place(VmDemand("db2", G, G, affinity=("db",)), [a, b]).name == "a"
    assert place(VmDemand("web2", G, G, anti_affinity=("web",)), [a, b]).name == "b"
    with pytest.raises(NoPlacement) as e:
        place(VmDemand("x", G, G, affinity=("db",), anti_affinity=("web",)), [a, b])
    assert "a: anti-affinity group 'web' has web1 here" in str(e.value)
    assert "b: affinity group 'db' runs on a" in str(e.value)


def test_a_vm_that_fits_nowhere_is_told_what_is_short_where() -> None:
    hosts = [HostSpace("a", 4 * G, 1 * G, 0), HostSpace("b", 4 * G, 2 * G, 3584 * M)]
    with pytest.raises(NoPlacement) as e:
        place(VmDemand("big", 2 * G, 1 * G), hosts)
    msg = str(e.value)
    assert "VM 'big' (2048 MiB startup, 1024 MiB minimum) fits nowhere" in msg
    assert "a: 1024 MiB free above the reserve, 2048 MiB startup wanted (1024 MiB short)" in msg
    assert "b: minimums of its VMs 3584 MiB of 4096 MiB: 1024 MiB more cannot be guaranteed" in msg
    with pytest.raises(NoPlacement, match="no live host"):
        place(VmDemand("v", G, G), [])
