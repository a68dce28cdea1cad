"""Emulated platform devices, one per module. A device sees only its registers and callbacks
(output, interrupt line); the worker wires it to I/O intercepts."""
