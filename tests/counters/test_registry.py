"""The counter registry: sets, instances, Perfmon paths, snapshots."""

from __future__ import annotations

import threading

import pytest

from pyhv.counters import CounterDef, CounterError, CounterRegistry, CounterSetDef, counter_path

pytestmark = pytest.mark.unit

INTERCEPTS = CounterSetDef(
    "pyhv Intercepts",
    (
        CounterDef("I/O Intercepts", "I/O port intercepts handled", "operations", "cumulative"),
        CounterDef("MSR Intercepts", "MSR intercepts handled", "operations", "cumulative"),
        CounterDef("Handler Time", "Time spent in intercept handlers", "seconds", "cumulative"),
    ),
    instance_label="vp",
)


def test_a_component_registers_its_own_counter_set_and_its_values_show_in_the_snapshot() -> None:
    registry = CounterRegistry()
    intercepts = registry.register(INTERCEPTS)
    intercepts.add("I/O Intercepts", 1, "vm1:0")
    intercepts.add("I/O Intercepts", 2, "vm1:0")
    intercepts.set("Handler Time", 0.25, "vm1:1")
    snap = registry.snapshot()
    assert snap["\\pyhv Intercepts(vm1:0)\\I/O Intercepts"] == 3.0
    assert snap["\\pyhv Intercepts(vm1:0)\\MSR Intercepts"] == 0.0
    assert snap["\\pyhv Intercepts(vm1:1)\\Handler Time"] == 0.25
    assert len(snap) == 6


def test_a_single_instance_set_has_paths_without_an_instance() -> None:
    registry = CounterRegistry()
    s = registry.register(CounterSetDef("Migration", (CounterDef("Passes", "p"),), None))
    s.set("Passes", 4)
    assert registry.snapshot() == {"\\Migration\\Passes": 4.0}
    assert counter_path("A", "b", "C") == "\\A(b)\\C"


def test_registering_the_same_set_twice_returns_the_same_values() -> None:
    registry = CounterRegistry()
    assert registry.register(INTERCEPTS) is registry.register(INTERCEPTS)
    other = CounterSetDef(INTERCEPTS.name, (CounterDef("Other", "x"),))
    with pytest.raises(CounterError, match="already registered"):
        registry.register(other)


def test_unknown_counters_and_missing_instances_are_refused_with_the_known_names() -> None:
    registry = CounterRegistry()
    s = registry.register(INTERCEPTS)
    with pytest.raises(CounterError, match="I/O Intercepts, MSR Intercepts"):
        s.add("CPUID Intercepts", 1, "vm1:0")
    with pytest.raises(CounterError, match="one instance per vp"):
        s.add("MSR Intercepts")
    with pytest.raises(CounterError, match="no counter set 'Nope'"):
        registry["Nope"]
    with pytest.raises(CounterError, match="unit"):
        CounterDef("X", "x", unit="furlongs")
    with pytest.raises(CounterError, match="twice"):
        CounterSetDef("S", (CounterDef("X", "x"), CounterDef("X", "y")))


def test_a_removed_instance_disappears_from_the_snapshot() -> None:
    registry = CounterRegistry()
    s = registry.register(INTERCEPTS)
    s.add("MSR Intercepts", 1, "gone")
    s.remove_instance("gone")
    assert registry.snapshot() == {}
    assert s.get("MSR Intercepts", "gone") == 0.0


def test_counters_updated_from_many_threads_lose_no_increment() -> None:
    registry = CounterRegistry()
    s = registry.register(INTERCEPTS)

    def work() -> None:
        for _ in range(2000):
            s.add("I/O Intercepts", 1, "vm1:0")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.get("I/O Intercepts", "vm1:0") == 8000
