"""The VMMS API described as OpenAPI 3 (served at /openapi.json; docs/vmms.md explains it)."""

from __future__ import annotations

from typing import Any

from pyhv.vmms.config import FIELDS

_ERROR = {"$ref": "#/components/schemas/Error"}
_VM = {"$ref": "#/components/schemas/Vm"}
_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
}
_MIGRATION = {"$ref": "#/components/schemas/Migration"}
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
_SIZE = {"oneOf": [{"type": "integer", "minimum": 0}, {"type": "string", "example": "512M"}]}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """A JSON object schema with these properties and no others."""
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _errors(*codes: int) -> dict[str, Any]:
    words = {
        400: "malformed request or a value out of range (the message says which and why)",
        401: "TCP only: missing or wrong bearer token",
        404: "no such VM or resource",
        405: "method not allowed here",
        409: "not possible in the VM's current state",
        411: "a body without Content-Length",
        413: "body larger than 64 KiB",
        415: "body not application/json",
        426: "console without the connection upgrade",
    }
    return {str(c): _json(_ERROR, words[c]) for c in (401, *codes)}


def _settings_schema(required: list[str]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for key, text in FIELDS.items():
        if key in ("memory", "minimum", "maximum"):
            props[key] = {**_SIZE, "description": text}
        elif key in ("vps", "buffer", "weight"):
            props[key] = {"type": "integer", "description": text}
        elif key == "dynamic_memory":
            props[key] = {"type": "boolean", "description": text}
        elif key == "image":
            props[key] = {"type": ["string", "null"], "description": text}
        else:
            props[key] = {"type": "string", "description": text}
    return _object(props, required)


def openapi() -> dict[str, Any]:
    vm_path = {"parameters": [_NAME_PARAM]}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pyhv VMMS",
            "version": "1",
            "description": (
                "The Virtual Machine Management Service of one host: VM inventory and "
                "configuration, starting and stopping VMs (one worker process each), Dynamic "
                "Memory, counters. Over a Unix socket (its file permissions admit its owner) or "
                "TCP on 127.0.0.1 with 'Authorization: Bearer <token>'."
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
                    "required": ["error", "status"],
                },
                "Settings": _settings_schema(["name"]),
                "SettingsChange": {
                    **_settings_schema([]),
                    "description": "a running VM may change only minimum (down), maximum (up), "
                    "buffer and weight; an off VM anything but its name",
                },
                "Vm": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "state": {
                            "type": "string",
                            "enum": [
                                "off",
                                "starting",
                                "running",
                                "stopping",
                                "crashed",
                                "incoming",
                                "paused",
                            ],
                            "description": "incoming: arriving by live migration; paused: a "
                            "migration in doubt left it paused (the reason says what to do)",
                        },
                        "migration": {
                            "type": ["string", "null"],
                            "description": "the migration it is part of while it migrates",
                        },
                        "reason": {"type": "string", "description": "how it last ended"},
                        "pid": {
                            "type": ["integer", "null"],
                            "description": "the worker process (in a jail: the jailed process)",
                        },
                        "jail_uid": {
                            "type": ["integer", "null"],
                            "description": "the uid/gid its worker runs as (VMMS with jails)",
                        },
                        "uptime_s": {"type": ["number", "null"]},
                        "settings": {"$ref": "#/components/schemas/Settings"},
                        "memory": {
                            "type": "object",
                            "description": "bytes, as the host accounts them (running VMs)",
                            "properties": {
                                k: {"type": "integer"} for k in ("visible", "assigned", "ballooned")
                            },
                        },
                        "enforcement": {
                            "type": "object",
                            "description": "the kernel's figures beside the worker's claims "
                            "(running VMs; docs/security.md): bytes, and how often the claims "
                            "disagreed",
                            "properties": {
                                "kernel_ram": {"type": ["integer", "null"]},
                                "cgroup_limit": {"type": ["integer", "null"]},
                                "cgroup_usage": {"type": ["integer", "null"]},
                                "overhead": {"type": ["integer", "null"]},
                                "claims_disagreements": {"type": "integer"},
                                "last_disagreement": {"type": ["string", "null"]},
                            },
                        },
                    },
                },
                "Migration": {
                    "type": "object",
                    "description": "one live migration as this VMMS sees it",
                    "properties": {
                        "id": {"type": "string"},
                        "direction": {"type": "string", "enum": ["outgoing", "incoming"]},
                        "vm": {"type": "string"},
                        "peer": {"type": "string", "description": "the other VMMS or source"},
                        "state": {
                            "type": "string",
                            "enum": [
                                "preparing",
                                "migrating",
                                "waiting",
                                "done",
                                "running",
                                "failed",
                                "in-doubt",
                            ],
                            "description": "source: preparing, migrating, then done, failed or "
                            "in-doubt (paused here); destination: waiting, then running or failed",
                        },
                        "error": {"type": "string"},
                        "progress": {
                            "type": ["object", "null"],
                            "description": "the source worker's latest progress report (phase, "
                            "passes, pages_sent, bytes_sent, dirty_pages, bandwidth, ...)",
                        },
                        "result": {"type": ["object", "null"]},
                        "remote_id": {
                            "type": "string",
                            "description": "source: the destination's id of this migration",
                        },
                        "started": {"type": "number"},
                        "ended": {"type": ["number", "null"]},
                    },
                },
                "Incoming": {
                    "type": "object",
                    "description": "where and with which one-time token the source worker connects",
                    "properties": {
                        "id": {"type": "string"},
                        "vm": {"type": "string"},
                        "host": {"type": "string"},
                        "port": {"type": "integer"},
                        "token": {"type": "string"},
                    },
                },
            },
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/api/vms": {
                "get": {
                    "summary": "list the VMs",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {"vms": {"type": "array", "items": _VM}},
                            },
                            "every VM",
                        ),
                        **_errors(),
                    },
                },
                "post": {
                    "summary": "create a VM (stored; not started)",
                    "requestBody": _json_body({"$ref": "#/components/schemas/Settings"}),
                    "responses": {
                        "201": _json(_VM, "created"),
                        **_errors(400, 409, 411, 413, 415),
                    },
                },
            },
            "/api/vms/{name}": {
                **vm_path,
                "get": {
                    "summary": "a VM's state and settings",
                    "responses": {"200": _json(_VM, "the VM"), **_errors(404)},
                },
                "patch": {
                    "summary": "change settings (the book's rules while running)",
                    "requestBody": _json_body({"$ref": "#/components/schemas/SettingsChange"}),
                    "responses": {
                        "200": _json(_VM, "changed"),
                        **_errors(400, 404, 409, 411, 413, 415),
                    },
                },
                "delete": {
                    "summary": "delete a VM that is not running",
                    "responses": {"204": {"description": "deleted"}, **_errors(404, 409)},
                },
            },
            "/api/vms/{name}/start": {
                **vm_path,
                "post": {
                    "summary": "start the VM in a worker process of its own",
                    "responses": {"200": _json(_VM, "running"), **_errors(400, 404, 409)},
                },
            },
            "/api/vms/{name}/stop": {
                **vm_path,
                "post": {
                    "summary": "stop the VM (its worker exits)",
                    "responses": {"200": _json(_VM, "off"), **_errors(400, 404, 409)},
                },
            },
            "/api/vms/{name}/memory": {
                **vm_path,
                "get": {
                    "summary": "Dynamic Memory status from the worker (bytes)",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    k: {"type": "integer"}
                                    for k in (
                                        "committed",
                                        "available",
                                        "visible",
                                        "assigned",
                                        "ballooned",
                                    )
                                },
                            },
                            "status",
                        ),
                        **_errors(404, 409),
                    },
                },
                "post": {
                    "summary": "balloon, unballoon or hot-add towards a target",
                    "requestBody": _json_body(_object({"target": _SIZE}, ["target"])),
                    "responses": {
                        "200": _json({"type": "object"}, "sent to the worker"),
                        **_errors(400, 404, 409, 411, 413, 415),
                    },
                },
            },
            "/api/vms/{name}/console": {
                **vm_path,
                "post": {
                    "summary": "attach to the serial console ('Upgrade: pyhv-console'; then raw "
                    "bytes both ways; the recent output first)",
                    "responses": {
                        "101": {"description": "switched to the console stream"},
                        **_errors(404, 409, 426),
                    },
                },
            },
            "/api/vms/{name}/migrate": {
                **vm_path,
                "post": {
                    "summary": "live-migrate the running VM to another VMMS (source side); "
                    "poll GET /api/migrations/{id} for progress",
                    "requestBody": _json_body(
                        _object(
                            {
                                "destination": {
                                    "type": "string",
                                    "description": "the destination VMMS's TCP API, HOST:PORT",
                                },
                                "token": {
                                    "type": "string",
                                    "description": "the destination VMMS's bearer token",
                                },
                                "options": {
                                    "type": "object",
                                    "description": "pyhv.migration MigrationOptions "
                                    "(downtime_target, bandwidth, compress, ...)",
                                },
                            },
                            ["destination", "token"],
                        )
                    ),
                    "responses": {
                        "202": _json(_MIGRATION, "started"),
                        **_errors(400, 404, 409, 411, 413, 415),
                    },
                },
            },
            "/api/migrations": {
                "get": {
                    "summary": "the migrations this VMMS knows (both directions)",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "migrations": {"type": "array", "items": _MIGRATION}
                                },
                            },
                            "every migration",
                        ),
                        **_errors(),
                    },
                },
            },
            "/api/migrations/incoming": {
                "post": {
                    "summary": "prepare to receive a VM (destination side, called by the source "
                    "VMMS): check its settings and this host's pool, create its entry and an "
                    "incoming worker with a one-time migration token",
                    "requestBody": _json_body(
                        _object(
                            {
                                "settings": {"$ref": "#/components/schemas/Settings"},
                                "memory": {
                                    "type": "integer",
                                    "description": "the VM's RAM now, bytes (>= startup)",
                                },
                                "source": {"type": "string"},
                            },
                            ["settings"],
                        )
                    ),
                    "responses": {
                        "201": _json({"$ref": "#/components/schemas/Incoming"}, "listening"),
                        **_errors(400, 409, 411, 413, 415),
                    },
                },
            },
            "/api/migrations/{id}": {
                "parameters": [_ID_PARAM],
                "get": {
                    "summary": "a migration's state and progress (either side)",
                    "responses": {"200": _json(_MIGRATION, "the migration"), **_errors(404)},
                },
                "delete": {
                    "summary": "cancel an incoming migration that has not arrived (the "
                    "destination drops the entry, the worker and the memory)",
                    "responses": {"200": _json(_MIGRATION, "cancelled"), **_errors(404, 409)},
                },
            },
            "/api/migrations/{id}/resolve": {
                "parameters": [_ID_PARAM],
                "post": {
                    "summary": "settle a migration in doubt (source side): resume the paused VM "
                    "here, or stop and forget it here because it runs at the destination",
                    "requestBody": _json_body(_object({"resume": {"type": "boolean"}}, ["resume"])),
                    "responses": {
                        "200": _json(_MIGRATION, "settled"),
                        **_errors(400, 404, 409, 411, 413, 415),
                    },
                },
            },
            "/api/host": {
                "get": {
                    "summary": "the host's memory pool for VMs (bytes; free excludes the reserve)",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    k: {"type": "integer"}
                                    for k in ("budget", "reserve", "free", "running_vms")
                                },
                            },
                            "the pool",
                        ),
                        **_errors(),
                    },
                },
            },
            "/api/counters": {
                "get": {
                    "summary": "every counter by its Perfmon path",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "time": {"type": "number"},
                                    "counters": {
                                        "type": "object",
                                        "additionalProperties": {"type": "number"},
                                    },
                                },
                            },
                            "a snapshot",
                        ),
                        **_errors(),
                    },
                },
            },
            "/metrics": {
                "get": {
                    "summary": "the counters in Prometheus text format",
                    "responses": {"200": {"description": "text/plain; version=0.0.4"}, **_errors()},
                },
            },
            "/perfmon": {
                "get": {
                    "summary": "live Perfmon-style charts of the counters (also at /; over TCP "
                    "pass ?token=...)",
                    "responses": {"200": {"description": "text/html"}, **_errors()},
                },
            },
            "/openapi.json": {
                "get": {
                    "summary": "this document",
                    "responses": {"200": {"description": "OpenAPI 3"}, **_errors()},
                },
            },
        },
    }
