"""Prometheus exposition of a counter registry: a custom collector, so metric names and labels
follow from the counter definitions and stay stable:
`\\Hyper-V Dynamic Memory VM(vm1)\\Physical Memory` (MB) becomes
`pyhv_dynamic_memory_vm_physical_memory_bytes{vm="vm1"}` (bytes), with the book's counter name
in the HELP text."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pyhv.counters.registry import CounterDef, CounterRegistry, CounterSetDef, snake

# unit -> (metric name suffix, factor from the counter's unit to the metric's)
_UNITS: dict[str, tuple[str, float]] = {
    "MB": ("_bytes", float(1 << 20)),
    "bytes": ("_bytes", 1.0),
    "percent": ("_percent", 1.0),
    "seconds": ("_seconds", 1.0),
    "pages": ("_pages", 1.0),
    "operations": ("", 1.0),
    "count": ("", 1.0),
}


def metric_name(s: CounterSetDef, c: CounterDef) -> str:
    """The metric family name (a cumulative counter is exposed with `_total` appended)."""
    suffix = _UNITS[c.unit][0]
    base = f"{s.metric_prefix}_{snake(c.name)}"
    return base if base.endswith(suffix) else base + suffix


def _help(s: CounterSetDef, c: CounterDef) -> str:
    return f"\\{s.name}\\{c.name} ({c.unit} in Perfmon): {c.help}"


class RegistryCollector(Collector):
    """Reads the counter registry at each scrape."""

    def __init__(self, registry: CounterRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for live in self._registry.sets():
            d = live.definition
            instances = list(live.items())
            labels = [d.instance_label] if d.instance_label else []
            for c in d.counters:
                name = metric_name(d, c)
                factor = _UNITS[c.unit][1]
                family: GaugeMetricFamily | CounterMetricFamily
                if c.kind == "cumulative":
                    family = CounterMetricFamily(name, _help(d, c), labels=labels)
                else:
                    family = GaugeMetricFamily(name, _help(d, c), labels=labels)
                for instance, values in instances:
                    family.add_metric([instance] if labels else [], values[c.name] * factor)
                yield family


def exposition_registry(registry: CounterRegistry) -> CollectorRegistry:
    """A prometheus_client registry serving `registry` (and nothing else, unlike the global
    default registry): pass it to `prometheus_client.start_http_server(port, addr,
    registry=...)` or `make_wsgi_app(registry=...)` to serve /metrics."""
    exposition = CollectorRegistry(auto_describe=False)
    exposition.register(RegistryCollector(registry))
    return exposition


def prometheus_text(registry: CounterRegistry) -> str:
    """The registry in the Prometheus text format (what an HTTP /metrics endpoint serves)."""
    return generate_latest(exposition_registry(registry)).decode("utf-8")
