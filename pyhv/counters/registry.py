"""Performance counters as Perfmon shows them: counter sets ("objects") of named counters, each
with instances (one per VM, say), addressed by path: `\\Hyper-V Dynamic Memory VM(vm1)\\Physical Memory`.

A registry holds the sets; components register their own (Dynamic Memory, intercepts,
migration) and update values; readers take a consistent snapshot. Thread-safe: VP threads, the
worker's loop and the VMMS all write counters.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

Kind = Literal["gauge", "cumulative"]
UNITS = ("MB", "percent", "operations", "count", "pages", "seconds", "bytes")


class CounterError(ValueError):
    """A counter set, counter or instance was misused; the message says which and what to do."""


@dataclass(frozen=True, slots=True)
class CounterDef:
    """One counter: its Perfmon name, what it means, its unit, and whether it only grows."""

    name: str
    help: str
    unit: str = "count"
    kind: Kind = "gauge"

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise CounterError(f"counter {self.name!r}: unit {self.unit!r} is not one of {UNITS}")
        if self.kind not in ("gauge", "cumulative"):
            raise CounterError(
                f"counter {self.name!r}: kind {self.kind!r} must be 'gauge' or 'cumulative'"
            )
        if "\\" in self.name or "(" in self.name:
            raise CounterError(f"counter name {self.name!r} must not contain '\\' or '('")


@dataclass(frozen=True, slots=True)
class CounterSetDef:
    """A counter set (Perfmon "object"). `instance_label` names the instances (Prometheus label,
    e.g. "vm"); None makes a single-instance set. `prometheus_name` overrides the metric prefix
    derived from the set name ("Hyper-V Dynamic Memory VM" -> "pyhv_dynamic_memory_vm")."""

    name: str
    counters: tuple[CounterDef, ...]
    instance_label: str | None = "instance"
    prometheus_name: str | None = None

    def __post_init__(self) -> None:
        names = [c.name for c in self.counters]
        if len(set(names)) != len(names):
            raise CounterError(f"counter set {self.name!r} lists a counter twice: {names}")
        if "\\" in self.name or "(" in self.name:
            raise CounterError(f"counter set name {self.name!r} must not contain '\\' or '('")

    @property
    def metric_prefix(self) -> str:
        if self.prometheus_name:
            return self.prometheus_name
        return "pyhv_" + snake(self.name.removeprefix("Hyper-V "))

    def counter(self, name: str) -> CounterDef:
        for c in self.counters:
            if c.name == name:
                return c
        raise CounterError(
            f"counter set {self.name!r} has no counter {name!r}; it has: "
            + ", ".join(c.name for c in self.counters)
        )


def snake(text: str) -> str:
    """'Guest Visible Physical Memory' -> 'guest_visible_physical_memory'."""
    return re.sub(r"[^0-9a-z]+", "_", text.lower()).strip("_")


SINGLE = ""  # the instance name of a single-instance set


def counter_path(set_name: str, instance: str, counter: str) -> str:
    """The Perfmon path of one counter instance."""
    where = f"({instance})" if instance else ""
    return f"\\{set_name}{where}\\{counter}"


class CounterSet:
    """The live values of one registered set: instance -> counter -> value."""

    def __init__(self, definition: CounterSetDef, lock: threading.RLock) -> None:
        self.definition = definition
        self._lock = lock
        self._names = frozenset(c.name for c in definition.counters)
        self._values: dict[str, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return self.definition.name

    def _instance(self, instance: str) -> dict[str, float]:
        single = self.definition.instance_label is None
        if single and instance != SINGLE:
            raise CounterError(
                f"counter set {self.name!r} has a single instance: call without an instance name"
            )
        if not single and not instance:
            raise CounterError(
                f"counter set {self.name!r} has one instance per {self.definition.instance_label}:"
                " give the instance name"
            )
        values = self._values.get(instance)
        if values is None:
            values = self._values[instance] = {c.name: 0.0 for c in self.definition.counters}
        return values

    def _check(self, counter: str) -> None:
        if counter not in self._names:
            self.definition.counter(counter)  # raises with the list of counters

    def set(self, counter: str, value: float, instance: str = SINGLE) -> None:
        self._check(counter)
        with self._lock:
            self._instance(instance)[counter] = float(value)

    def add(self, counter: str, delta: float = 1.0, instance: str = SINGLE) -> None:
        self._check(counter)
        with self._lock:
            values = self._instance(instance)
            values[counter] += delta

    def update(self, values: dict[str, float], instance: str = SINGLE) -> None:
        """Set several counters of one instance at once (one lock round trip)."""
        for counter in values:
            self._check(counter)
        with self._lock:
            self._instance(instance).update((k, float(v)) for k, v in values.items())

    def get(self, counter: str, instance: str = SINGLE) -> float:
        self._check(counter)
        with self._lock:
            return self._values.get(instance, {}).get(counter, 0.0)

    def instances(self) -> list[str]:
        with self._lock:
            return list(self._values)

    def remove_instance(self, instance: str) -> None:
        """Drop an instance (a VM that was deleted); its counters disappear from readers."""
        with self._lock:
            self._values.pop(instance, None)

    def items(self) -> Iterator[tuple[str, dict[str, float]]]:
        """(instance, values) pairs, copied under the lock."""
        with self._lock:
            copy = [(i, dict(v)) for i, v in self._values.items()]
        return iter(copy)


class CounterRegistry:
    """All counter sets of one host (or one test)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._sets: dict[str, CounterSet] = {}

    def register(self, definition: CounterSetDef) -> CounterSet:
        """Register a set and return its live values. Registering the same definition again
        returns the existing set; a different definition under the same name is an error."""
        with self._lock:
            existing = self._sets.get(definition.name)
            if existing is not None:
                if existing.definition != definition:
                    raise CounterError(
                        f"counter set {definition.name!r} is already registered with other "
                        "counters; use another name or the same definition"
                    )
                return existing
            live = self._sets[definition.name] = CounterSet(definition, self._lock)
            return live

    def __getitem__(self, name: str) -> CounterSet:
        try:
            return self._sets[name]
        except KeyError:
            raise CounterError(
                f"no counter set {name!r} is registered; registered: {sorted(self._sets)}"
            ) from None

    def sets(self) -> list[CounterSet]:
        with self._lock:
            return list(self._sets.values())

    def snapshot(self) -> dict[str, float]:
        """Every counter instance's value, keyed by Perfmon path, taken atomically."""
        with self._lock:
            return {
                counter_path(s.name, instance, counter): value
                for s in self._sets.values()
                for instance, values in s._values.items()
                for counter, value in values.items()
            }
