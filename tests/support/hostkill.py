"""Killing a whole host the way a power cut does (SIGKILL to the VMMS and its workers at
once): pyhv.cluster.lab's, which `pyhv experiment cluster` uses too."""

from pyhv.cluster.lab import host_processes, kill_host

__all__ = ["host_processes", "kill_host"]
