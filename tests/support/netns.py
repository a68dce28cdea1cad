"""Hosts as network namespaces on a bridge for the cluster tests: pyhv.cluster.lab's, which
`pyhv experiment cluster` uses too (its docstring says how)."""

from pyhv.cluster.lab import LabHost, NetnsLab, netns_lab

__all__ = ["LabHost", "NetnsLab", "netns_lab"]
