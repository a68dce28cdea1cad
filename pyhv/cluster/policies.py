"""Cluster balancing policies by name, for `--policy`: "host-only" (pyhv.cluster.policy.HostOnly),
"cluster" (pyhv.cluster.balancer.CostRelief), or a user's own from a Python file or module
(the interface: pyhv.cluster.policy)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyhv.cluster.balancer import CostRelief
from pyhv.cluster.policy import ClusterPolicy, ClusterSnapshot, HostOnly, Limits, Plan, PolicyError


def load_policy(spec: str, limits: Limits | None = None) -> ClusterPolicy:
    """A policy by name: "host-only", "cluster" (pyhv.cluster.balancer.CostRelief), a Python
    file ("mypolicy.py") or a module ("pkg.mod" or "pkg.mod:attribute") defining `policy` (an
    object with `name` and `plan`) or a function `plan(snapshot)`."""
    if spec == "host-only":
        return HostOnly()
    if spec == "cluster":
        return CostRelief(limits or Limits())
    module_name, _, attribute = spec.partition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            loader = importlib.util.spec_from_file_location(f"pyhv_user_policy_{path.stem}", path)
            if loader is None or loader.loader is None or not path.is_file():
                raise PolicyError(f"policy file {path} not found: give a path to a .py file")
            module: Any = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except PolicyError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way
        raise PolicyError(
            f"policy {spec!r}: cannot load it ({type(e).__name__}: {e}); give host-only, "
            "cluster, a .py file or a module:attribute"
        ) from None
    found = getattr(module, attribute or "policy", None)
    if found is None and not attribute:
        fn = getattr(module, "plan", None)
        if callable(fn):
            default = Path(module_name).stem if module_name.endswith(".py") else module_name
            return _FunctionPolicy(str(getattr(module, "name", default)), fn)
    if found is None or not callable(getattr(found, "plan", None)):
        raise PolicyError(
            f"policy {spec!r} defines no `policy` object with a plan(snapshot) method nor a "
            "function plan(snapshot)"
        )
    return found  # type: ignore[no-any-return]


@dataclass
class _FunctionPolicy:
    name: str
    fn: Callable[[ClusterSnapshot], Plan]

    def plan(self, snapshot: ClusterSnapshot) -> Plan:
        return self.fn(snapshot)
