"""Performance counters: a registry of counter sets under the book's names, snapshot, CSV
logs, Prometheus exposition and Perfmon-style charts.

The chart helper (matplotlib) and the Dynamic Memory sets are imported from their modules,
`pyhv.counters.chart` and `pyhv.counters.dynmem`, so that importing the registry stays light.
"""

from pyhv.counters.csvlog import CsvLog, Sample, read_csv
from pyhv.counters.prometheus import (
    RegistryCollector,
    exposition_registry,
    metric_name,
    prometheus_text,
)
from pyhv.counters.registry import (
    CounterDef,
    CounterError,
    CounterRegistry,
    CounterSet,
    CounterSetDef,
    counter_path,
)

__all__ = [
    "CounterDef",
    "CounterError",
    "CounterRegistry",
    "CounterSet",
    "CounterSetDef",
    "CsvLog",
    "RegistryCollector",
    "Sample",
    "counter_path",
    "exposition_registry",
    "metric_name",
    "prometheus_text",
    "read_csv",
]
