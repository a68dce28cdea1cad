"""Prometheus exposition: stable names and labels, the book's counter names in HELP."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from pyhv.counters import CounterRegistry, exposition_registry, prometheus_text
from pyhv.counters.dynmem import BALANCER, VM, DynamicMemoryCounters

pytestmark = pytest.mark.unit


def families(
    text: str,
) -> dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]]:
    out = {}
    for f in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples}
        out[f.name] = (f.type, f.documentation, samples)
    return out


def test_physical_memory_is_exposed_in_bytes_per_vm_with_the_book_counter_name_in_help() -> None:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry)
    dm.vm.set("Physical Memory", 1712.5, "testvm")
    dm.vm.set("Guest Visible Physical Memory", 2048, "testvm")
    dm.vm.set("Physical Memory", 512, "other")
    parsed = families(prometheus_text(registry))
    kind, help_text, samples = parsed["pyhv_dynamic_memory_vm_physical_memory_bytes"]
    assert kind == "gauge"
    assert "\\Hyper-V Dynamic Memory VM\\Physical Memory" in help_text
    name = "pyhv_dynamic_memory_vm_physical_memory_bytes"
    assert samples[(name, (("vm", "testvm"),))] == 1712.5 * 2**20
    assert samples[(name, (("vm", "other"),))] == 512 * 2**20
    visible = parsed["pyhv_dynamic_memory_vm_guest_visible_physical_memory_bytes"][2]
    assert (
        visible[("pyhv_dynamic_memory_vm_guest_visible_physical_memory_bytes", (("vm", "testvm"),))]
        == 2048 * 2**20
    )


def test_added_memory_and_operation_counts_are_prometheus_counters() -> None:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry)
    dm.vm.add("Memory Add Operations", 2, "testvm")
    dm.vm.add("Added Memory", 300, "testvm")
    parsed = families(prometheus_text(registry))
    kind, _, samples = parsed["pyhv_dynamic_memory_vm_memory_add_operations"]
    assert kind == "counter"
    assert samples[("pyhv_dynamic_memory_vm_memory_add_operations_total", (("vm", "testvm"),))] == 2
    _, _, added = parsed["pyhv_dynamic_memory_vm_added_memory_bytes"]
    assert (
        added[("pyhv_dynamic_memory_vm_added_memory_bytes_total", (("vm", "testvm"),))]
        == 300 * 2**20
    )


def test_the_balancer_set_has_one_instance_and_no_label() -> None:
    registry = CounterRegistry()
    dm = DynamicMemoryCounters(registry)
    dm.balancer.set("Average Pressure", 83.3)
    dm.balancer.set("Available Memory For Balancing", -100)
    parsed = families(prometheus_text(registry))
    _, help_text, samples = parsed["pyhv_dynamic_memory_balancer_average_pressure_percent"]
    assert f"\\{BALANCER}\\Average Pressure" in help_text
    assert samples == {("pyhv_dynamic_memory_balancer_average_pressure_percent", ()): 83.3}
    avail = parsed["pyhv_dynamic_memory_balancer_available_memory_for_balancing_bytes"][2]
    assert list(avail.values()) == [-100 * 2**20]
    assert VM == "Hyper-V Dynamic Memory VM"


def test_the_counters_are_served_over_http_for_prometheus_to_scrape() -> None:
    registry = CounterRegistry()
    DynamicMemoryCounters(registry).vm.set("Current Pressure", 120, "testvm")
    server, thread = start_http_server(0, "127.0.0.1", registry=exposition_registry(registry))
    try:
        port = server.server_address[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read().decode()
    finally:
        server.shutdown()
        thread.join(timeout=10)
    parsed = families(text)
    samples = parsed["pyhv_dynamic_memory_vm_current_pressure_percent"][2]
    assert samples == {
        ("pyhv_dynamic_memory_vm_current_pressure_percent", (("vm", "testvm"),)): 120
    }
    assert not any(name.startswith("python_") for name in parsed), "only our counters"
