"""pyhv: the Hyper-V virtualization stack of Windows Internals, built in Python on Linux KVM."""

__version__ = "0.1.0"
