"""The VM worker (the book's VMWP): one per running VM. It owns the partition, boots the
guest, runs each VP in a thread, emulates the platform devices through intercepts and reports
how the VM ended.

- :class:`VmConfig` (validated configuration), :class:`VirtualMachine` (the worker in this
  process), :class:`WorkerProcess` (the same VM in its own process, `python -m pyhv.worker`),
  :class:`VmEnd` (how a VM ended).
"""

from pyhv.worker.config import ConfigError, VmConfig, parse_size
from pyhv.worker.outcome import VmEnd
from pyhv.worker.process import WorkerProcess
from pyhv.worker.vm import VirtualMachine

__all__ = ["ConfigError", "VirtualMachine", "VmConfig", "VmEnd", "WorkerProcess", "parse_size"]
