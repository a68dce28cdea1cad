"""The VM worker (the book's VMWP): one per running VM. It owns the partition, boots the
guest, runs each VP in a thread, emulates the platform devices through intercepts and reports
how the VM ended.

- :class:`VmConfig` (validated configuration), :class:`VirtualMachine` (the worker in this
  process), :class:`WorkerProcess` (the same VM in its own process, `python -m pyhv.worker`),
  :class:`VmEnd` (how a VM ended).

Names are imported on first use, so `pyhv run` loads only what booting needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pyhv.worker.config import ConfigError, VmConfig, parse_size
    from pyhv.worker.outcome import VmEnd
    from pyhv.worker.process import WorkerProcess
    from pyhv.worker.vm import VirtualMachine

_WHERE = {
    "ConfigError": "pyhv.worker.config",
    "VmConfig": "pyhv.worker.config",
    "parse_size": "pyhv.worker.config",
    "VmEnd": "pyhv.worker.outcome",
    "WorkerProcess": "pyhv.worker.process",
    "VirtualMachine": "pyhv.worker.vm",
}

__all__ = ["ConfigError", "VirtualMachine", "VmConfig", "VmEnd", "WorkerProcess", "parse_size"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'pyhv.worker' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
