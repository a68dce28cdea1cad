"""Counter logs as CSV: one row per sample, a column per counter instance."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.counters import CounterDef, CounterRegistry, CounterSetDef, CsvLog, read_csv

pytestmark = pytest.mark.unit

VMSET = CounterSetDef(
    "Test VM",
    (CounterDef("Physical Memory", "m", "MB"), CounterDef("Pressure", "p", "percent")),
    "vm",
)


def test_a_counter_log_reads_back_exactly_as_it_was_sampled(tmp_path: Path) -> None:
    registry = CounterRegistry()
    vms = registry.register(VMSET)
    log = CsvLog(tmp_path / "log.csv", registry)
    written = []
    for t, (mem, pressure) in enumerate([(512.0, 83.25), (1712.5, 100.0), (0.1 + 0.2, 1e-9)]):
        vms.update({"Physical Memory": mem, "Pressure": pressure}, "vm1")
        written.append(log.sample(time_s=float(t)))
    back = read_csv(tmp_path / "log.csv")
    assert back == written
    header = (tmp_path / "log.csv").read_text().splitlines()[0]
    assert header == "Time (s),\\Test VM(vm1)\\Physical Memory,\\Test VM(vm1)\\Pressure"


def test_a_vm_that_appears_later_gets_its_own_column_blank_before_it_existed(
    tmp_path: Path,
) -> None:
    registry = CounterRegistry()
    vms = registry.register(VMSET)
    log = CsvLog(tmp_path / "log.csv", registry)
    vms.set("Physical Memory", 512, "vm1")
    log.sample(0.0)
    vms.set("Physical Memory", 256, "vm2")
    log.sample(1.0)
    first, second = read_csv(tmp_path / "log.csv")
    assert "\\Test VM(vm2)\\Physical Memory" not in first.values
    assert second.values["\\Test VM(vm2)\\Physical Memory"] == 256
    assert first.values["\\Test VM(vm1)\\Physical Memory"] == 512
    assert len(log.columns) == 4


def test_a_log_limited_to_chosen_counters_has_only_those_columns(tmp_path: Path) -> None:
    registry = CounterRegistry()
    vms = registry.register(VMSET)
    vms.set("Physical Memory", 512, "vm1")
    chosen = ["\\Test VM(vm1)\\Physical Memory", "\\Test VM(vm9)\\Physical Memory"]
    log = CsvLog(tmp_path / "log.csv", registry, columns=chosen)
    log.sample(0.0)
    (only,) = read_csv(tmp_path / "log.csv")
    assert only.values == {chosen[0]: 512.0}
    assert log.columns == chosen


def test_the_sample_time_defaults_to_seconds_since_the_log_started(tmp_path: Path) -> None:
    now = [100.0]
    log = CsvLog(tmp_path / "log.csv", CounterRegistry(), clock=lambda: now[0])
    now[0] = 102.5
    assert log.sample().time_s == 2.5


def test_a_file_that_is_not_a_counter_log_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a counter log"):
        read_csv(tmp_path / "x.csv")
