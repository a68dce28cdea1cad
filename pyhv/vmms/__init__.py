"""The Virtual Machine Management Service (the book's VMMS), one per host: VM inventory and
configuration (`config`, `store`), running each VM in a worker process and reporting crashes
(`service`), the host's memory pool (`pool`), the Dynamic Memory balancer loop (`balancing`),
the HTTP/JSON API (`api`, `openapi`, `server`), its client and the `pyhv vm` commands
(`client`, `cli`), and a live Perfmon-style chart page (`static/perfmon.html`).
"""
