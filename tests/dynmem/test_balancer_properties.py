"""Invariants of the balancer over random hosts and VMs (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.dynmem.balancer import (
    Add,
    BalancerConfig,
    HostMemory,
    MemorySettings,
    Remove,
    StatusReport,
    VmMemoryState,
    decide,
)

pytestmark = pytest.mark.unit

PAGES = st.integers(min_value=1, max_value=200_000)


@st.composite
def vm_states(draw: st.DrawFn, name: str) -> VmMemoryState:
    a, b, c = sorted(draw(st.lists(PAGES, min_size=3, max_size=3)))
    cfg = MemorySettings(
        startup_pages=b,
        minimum_pages=a,
        maximum_pages=c,
        buffer_percent=draw(st.integers(5, 2000)),
        weight=draw(st.integers(0, 100)),
    )
    visible = draw(st.integers(a, c))
    ballooned = draw(st.integers(0, visible))
    committed = draw(st.none() | st.integers(0, 300_000))
    return VmMemoryState(
        vm=name,
        settings=cfg,
        visible_pages=visible,
        assigned_pages=visible - ballooned,
        ballooned_pages=ballooned,
        report=None if committed is None else StatusReport(committed),
        above_target_s=draw(st.sampled_from([0.0, 5.0, 179.0, 500.0])),
    )


@st.composite
def scenes(draw: st.DrawFn) -> tuple[HostMemory, list[VmMemoryState], BalancerConfig]:
    n = draw(st.integers(1, 8))
    vms = [draw(vm_states(f"vm{i}")) for i in range(n)]
    host = HostMemory(draw(st.integers(0, 1_000_000)), draw(st.integers(0, 300_000)))
    config = BalancerConfig(
        remove_delay_s=draw(st.sampled_from([0.0, 30.0, 180.0])),
        remove_step_pages=draw(st.integers(1, 50_000)),
        min_operation_pages=draw(st.sampled_from([0, 1, 256])),
    )
    return host, vms, config


@settings(max_examples=300, deadline=None)
@given(scenes())
def test_no_vm_goes_below_minimum_or_above_maximum_and_no_add_reaches_into_the_reserve(
    scene: tuple[HostMemory, list[VmMemoryState], BalancerConfig],
) -> None:
    host, vms, config = scene
    d = decide(host, vms, config)
    by_name = {v.vm: v for v in vms}
    seen: set[str] = set()
    added = 0
    for op in d.operations:
        assert op.vm not in seen, "one VM got two operations in one tick"
        seen.add(op.vm)
        v = by_name[op.vm]
        s = v.settings
        assert op.pages > 0
        if isinstance(op, Add):
            assert op.pages == op.unballoon + op.hot_add
            assert 0 <= op.unballoon <= v.ballooned_pages
            assert op.hot_add >= 0
            assert op.hot_add == 0 or op.unballoon == v.ballooned_pages, "unballoon comes first"
            assert v.assigned_pages + op.pages <= s.maximum_pages
            assert v.visible_pages + op.hot_add <= s.maximum_pages
            added += op.pages
        else:
            assert isinstance(op, Remove)
            assert v.assigned_pages - op.pages >= s.minimum_pages
    assert added <= host.available_pages


@settings(max_examples=200, deadline=None)
@given(scenes())
def test_without_a_memory_shortage_memory_is_only_removed_after_the_lazy_delay(
    scene: tuple[HostMemory, list[VmMemoryState], BalancerConfig],
) -> None:
    host, vms, config = scene
    d = decide(host, vms, config)
    for i, v in enumerate(vms):
        op = d.operation_for(v.vm)
        if isinstance(op, Remove) and not d.host_short:
            assert v.above_target_s + config.tick_s >= config.effective_remove_delay_s
            assert op.pages <= config.remove_step_pages
            assert v.assigned_pages - op.pages >= d.target_pages[i]
        if isinstance(op, Add):
            assert v.assigned_pages < d.target_pages[i]


@settings(max_examples=200, deadline=None)
@given(scenes())
def test_a_vm_with_memory_to_spare_is_never_given_more(
    scene: tuple[HostMemory, list[VmMemoryState], BalancerConfig],
) -> None:
    host, vms, config = scene
    d = decide(host, vms, config)
    for i, v in enumerate(vms):
        if v.assigned_pages >= d.target_pages[i]:
            assert not isinstance(d.operation_for(v.vm), Add)


def pages_needed(v: VmMemoryState) -> int:
    """Demand without buffer, within the VM's limits (a VM without a report: what it has)."""
    demand = v.report.committed_pages if v.report is not None else v.assigned_pages
    return max(min(demand, v.settings.maximum_pages), v.settings.minimum_pages)


@settings(max_examples=300, deadline=None)
@given(scenes())
def test_memory_a_vm_demands_is_only_taken_for_a_higher_weight_vm_left_short(
    scene: tuple[HostMemory, list[VmMemoryState], BalancerConfig],
) -> None:
    host, vms, config = scene
    d = decide(host, vms, config)

    def granted(v: VmMemoryState) -> int:
        op = d.operation_for(v.vm)
        return op.pages if isinstance(op, Add) else 0

    short_weights = [
        v.settings.weight for v in vms if v.assigned_pages + granted(v) < pages_needed(v)
    ]
    for v in vms:
        op = d.operation_for(v.vm)
        if isinstance(op, Remove) and v.assigned_pages - op.pages < pages_needed(v):
            assert d.host_short
            assert any(w > v.settings.weight for w in short_weights)
