"""The book's experiment "Watching Dynamic Memory" as the counters record it: a simulated VM
under Testlimit, the balancer ticking, the counters logged to CSV and charted like Perfmon."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyhv.counters import CounterRegistry, CsvLog, read_csv
from pyhv.counters.chart import draw_chart
from pyhv.counters.dynmem import VM, DynamicMemoryCounters
from pyhv.dynmem.balancer import (
    BalancerConfig,
    HostMemory,
    MemorySettings,
    StatusReport,
    VmMemoryState,
    applied,
    decide,
    host_after,
    pages_from_mib,
)
from tests.support.testlimit import committed_under_testlimit

pytestmark = pytest.mark.simulation

MIB = pages_from_mib(1)
VISIBLE = f"\\{VM}(testvm)\\Guest Visible Physical Memory"
PHYSICAL = f"\\{VM}(testvm)\\Physical Memory"


def test_the_counters_show_the_jumps_and_the_late_trim_and_chart_them(tmp_path: Path) -> None:
    registry = CounterRegistry()
    counters = DynamicMemoryCounters(registry)
    log = CsvLog(tmp_path / "dm.csv", registry, columns=[VISIBLE, PHYSICAL])
    config = BalancerConfig(time_scale=0.1)  # the trim comes 18 s after Testlimit ends
    host = HostMemory(free_pages=8192 * MIB, reserve_pages=1024 * MIB)
    vm = VmMemoryState("testvm", MemorySettings.from_mib(512, 256, 4096), 512 * MIB, 512 * MIB)
    for t in range(150):
        vm = replace(vm, report=StatusReport(committed_under_testlimit(t), 200 * MIB))
        d = decide(host, [vm], config)
        counters.record_tick([vm], d)
        log.sample(float(t))
        for op in d.operations:
            counters.record_operation(op)
        vm = applied(replace(vm, above_target_s=d.above_target_s[0]), d.operation_for("testvm"))
        host = host_after(host, d.operations)

    rows = read_csv(tmp_path / "dm.csv")
    physical = [r.values[PHYSICAL] for r in rows]
    visible = [r.values[VISIBLE] for r in rows]
    # The counters show the state a tick saw: the t=10 addition appears at t=11.
    assert physical[10] == visible[10] == 512
    assert physical[11] == visible[11] > 1400  # both jump, to the same value
    assert physical[41] == visible[41] > physical[40]  # and again
    assert physical[100 + 17] == physical[99]  # unchanged for the (scaled) delay
    assert physical[-1] < 520 and visible[-1] == visible[99]  # trimmed; visible stays
    assert counters.vm.get("Memory Add Operations", "testvm") == 2
    assert counters.vm.get("Memory Remove Operations", "testvm") > 2
    added = counters.vm.get("Added Memory", "testvm")
    removed = counters.vm.get("Removed Memory", "testvm")
    assert added - removed == (vm.assigned_pages - 512 * MIB) / MIB

    png = tmp_path / "dm.png"
    colors = draw_chart(rows, [VISIBLE, PHYSICAL], png, y_max=1.5 * max(visible))
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    for color in colors.values():
        want = np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(rgb - want).sum(axis=2) <= 30).sum() > 200
