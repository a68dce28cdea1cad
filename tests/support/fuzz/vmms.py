"""Fuzz target of the VMMS API's request bodies: the body's bytes parsed as the API parses them
(JSON, no NaN/Infinity constants, an object), decoded against every declared request body
(pyhv.vmms.bodies) and then through the checks the service runs on what decoded (a new VM's
settings, a change of them, a memory target's size). The whole HTTP request, sent as raw bytes
to a live server, is in tests/support/fuzz/vmms_http.py."""

from __future__ import annotations

import json
from typing import Any

from pyhv.sizes import SizeError, parse_size
from pyhv.vmms import bodies
from pyhv.vmms.config import VmSettingsError, apply_changes, settings_from_dict
from tests.support.fuzz import Target

KINDS: tuple[type[Any], ...] = (
    bodies.NoFields,
    bodies.MemoryTarget,
    bodies.MigrateRequest,
    bodies.IncomingRequest,
    bodies.Resolve,
    bodies.Settings,
    bodies.SettingsChange,
)


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


_CURRENT = settings_from_dict({"name": "vm", "memory": "512M", "dynamic_memory": True})


def decode_body(data: bytes) -> None:
    try:
        value = json.loads(data, parse_constant=_no_constants)
    except (ValueError, RecursionError):  # the API answers 400 (pyhv.vmms.api)
        return
    if not isinstance(value, dict):
        return
    for kind in KINDS:
        try:
            body = bodies.decode(value, kind)
        except bodies.BodyError:
            continue
        given = bodies.given(body)
        try:
            if kind is bodies.Settings:
                settings_from_dict(given)
            elif kind is bodies.SettingsChange:
                apply_changes(_CURRENT, given, running=False)
                apply_changes(_CURRENT, given, running=True)
            elif kind is bodies.IncomingRequest:
                settings_from_dict(given["settings"])
            elif kind is bodies.MemoryTarget:
                parse_size(body.target)
        except (VmSettingsError, SizeError):
            pass


def body_seeds() -> list[bytes]:
    objects: list[dict[str, Any]] = [
        {},
        {"target": "768M"},
        {"target": 805306368},
        {"destination": "10.0.0.2:8080", "token": "t" * 32, "options": {"bandwidth": 1 << 30}},
        {"settings": {"name": "vm", "memory": "1G", "dynamic_memory": True}, "memory": 1 << 30},
        {"resume": True},
        {
            "name": "web-1",
            "vps": 2,
            "memory": "1G",
            "dynamic_memory": True,
            "minimum": "512M",
            "maximum": "4G",
            "buffer": 20,
            "weight": 50,
            "image": "pyhv-guest.elf",
            "cmdline": "console=ttyS0",
        },
        {"minimum": "256M", "maximum": "8G", "buffer": 10, "weight": 80},
    ]
    return [json.dumps(o).encode() for o in objects]


BODIES = Target(
    "vmms.bodies",
    "VMMS API request bodies: JSON, declared bodies, settings checks (pyhv.vmms.bodies)",
    body_seeds,
    decode_body,
    (),
    max_size=16384,
    json=True,
)
TARGETS = [BODIES]
