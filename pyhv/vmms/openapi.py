"""The VMMS API described as OpenAPI 3 (served at /openapi.json; docs/vmms.md explains it).
The schemas are generated from the declared bodies (pyhv.vmms.bodies); this module only lists
the routes. ``python -m pyhv.vmms.openapi > docs/openapi.json`` writes the committed copy (a
test checks the served, the committed and the generated documents are one)."""

from __future__ import annotations

import json
import sys
from typing import Any

import msgspec

from pyhv.vmms import bodies


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


_ERROR = _ref(bodies.Error)
_VM = _ref(bodies.Vm)
_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"},
}
_MIGRATION = _ref(bodies.Migration)
_ID_PARAM = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _json_body(kind: type, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(kind)}}}


def schemas() -> dict[str, Any]:
    """The JSON Schemas of every declared body, by name."""
    _, components = msgspec.json.schema_components(
        bodies.SCHEMAS, ref_template="#/components/schemas/{name}"
    )
    return components


def _errors(*codes: int) -> dict[str, Any]:
    words = {
        400: "malformed request or a value out of range (the message says which and why)",
        401: "TCP only: missing or wrong bearer token (in the Authorization header; ?token= "
        "is refused)",
        403: "TCP only: a token whose scope may not do this (the migration token only brings "
        "VMs in, the cluster token only places them)",
        408: "the body did not arrive in time",
        404: "no such VM or resource",
        405: "method not allowed here",
        409: "not possible in the VM's current state",
        411: "a body without Content-Length",
        413: "body larger than 64 KiB",
        415: "body not application/json",
    }
    return {str(c): _json(_ERROR, words[c]) for c in (401, *codes)}


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
                "TCP (TLS with client certificates beyond loopback) with 'Authorization: Bearer "
                "<token>': the admin token; the migration token, which may only bring a VM in "
                "(POST /api/migrations/incoming, GET and DELETE /api/migrations/{id} of an "
                "incoming migration); or the cluster token, which may only place VMs (POST "
                "/api/vms, POST /api/vms/{name}/start and /migrate, GET /api/migrations/{id}). "
                "Tokens in URLs are refused."
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas(),
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/api/vms": {
                "get": {
                    "summary": "list the VMs",
                    "responses": {
                        "200": _json(_ref(bodies.VmList), "every VM"),
                        **_errors(),
                    },
                },
                "post": {
                    "summary": "create a VM (stored; not started)",
                    "requestBody": _json_body(bodies.Settings),
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
                    "requestBody": _json_body(bodies.SettingsChange),
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
                    "summary": "start the VM in a worker process of its own (restart: stop it "
                    "first; Smart Paging may cover a short pool)",
                    "requestBody": _json_body(bodies.Start, required=False),
                    "responses": {"200": _json(_VM, "running"), **_errors(400, 404, 409)},
                },
            },
            "/api/vms/{name}/stop": {
                **vm_path,
                "post": {
                    "summary": "stop the VM (its worker exits)",
                    "requestBody": _json_body(bodies.NoFields, required=False),
                    "responses": {"200": _json(_VM, "off"), **_errors(400, 404, 409)},
                },
            },
            "/api/vms/{name}/memory": {
                **vm_path,
                "get": {
                    "summary": "Dynamic Memory status from the worker (bytes)",
                    "responses": {
                        "200": _json(_ref(bodies.MemoryStatus), "status"),
                        **_errors(404, 409),
                    },
                },
                "post": {
                    "summary": "balloon, unballoon or hot-add towards a target",
                    "requestBody": _json_body(bodies.MemoryTarget),
                    "responses": {
                        "200": _json(_ref(bodies.MemoryTargetAccepted), "sent to the worker"),
                        **_errors(400, 404, 409, 411, 413, 415),
                    },
                },
            },
            "/api/vms/{name}/memory/resize": {
                **vm_path,
                "post": {
                    "summary": "resize a running VM (Set-VMMemory -StartupBytes): hot-add or "
                    "hot-remove to `memory`; the answer says what the guest gave",
                    "requestBody": _json_body(bodies.MemoryResize),
                    "responses": {
                        "200": _json(_ref(bodies.MemoryResized), "done, or done in part"),
                        **_errors(400, 404, 409, 411, 413, 415),
                    },
                },
            },
            "/api/vms/{name}/console": {
                **vm_path,
                "post": {
                    "summary": "attach to the serial console: the request's body (chunked, "
                    "kept open) is typed, the answer's body (chunked) is what the guest prints, "
                    "the recent output first, until the VM ends; a client that does not read is "
                    "dropped",
                    "responses": {
                        "200": {"description": "the console's output, streamed"},
                        **_errors(404, 409),
                    },
                },
            },
            "/api/vms/{name}/trace": {  # flight recorder (pyhv.trace)
                **vm_path,
                "post": {
                    "summary": "watch the VM's flight recorder: the answer's body (chunked) is one "
                    "JSON event a line, see docs/trace.md, while the request stays open; "
                    "tracing is on while anyone watches",
                    "parameters": [
                        {
                            "name": "only",
                            "in": "query",
                            "required": False,
                            "description": "kinds, comma-separated: dm,io,mmio,msr,vmbus,"
                            "balancer,migration (only their sources are turned on)",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "the events, streamed"},
                        **_errors(400, 404, 409),
                    },
                },
            },
            "/api/vms/{name}/migrate": {
                **vm_path,
                "post": {
                    "summary": "live-migrate the running VM to another VMMS (source side); "
                    "poll GET /api/migrations/{id} for progress",
                    "requestBody": _json_body(bodies.MigrateRequest),
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
                        "200": _json(_ref(bodies.MigrationList), "every migration"),
                        **_errors(),
                    },
                },
            },
            "/api/migrations/incoming": {
                "post": {
                    "summary": "prepare to receive a VM (destination side, called by the source "
                    "VMMS): check its settings and this host's pool, create its entry and an "
                    "incoming worker with a one-time migration token",
                    "requestBody": _json_body(bodies.IncomingRequest),
                    "responses": {
                        "201": _json(_ref(bodies.Incoming), "listening"),
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
                    "requestBody": _json_body(bodies.Resolve),
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
                        "200": _json(_ref(bodies.HostPool), "the pool"),
                        **_errors(),
                    },
                },
            },
            "/api/counters": {
                "get": {
                    "summary": "every counter by its Perfmon path",
                    "responses": {
                        "200": _json(_ref(bodies.CounterSnapshot), "a snapshot"),
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
                    "summary": "live Perfmon-style charts of the counters (also at /). Over TCP "
                    "a browser opens the one-time URL from POST /api/chart-codes: ?code= is "
                    "spent for a short-lived cookie (HttpOnly, SameSite=Strict) and answered "
                    "with 303 to /perfmon",
                    "parameters": [
                        {
                            "name": "code",
                            "in": "query",
                            "required": False,
                            "description": "a one-time code from POST /api/chart-codes",
                            "schema": {"type": "string"},
                        }
                    ],
                    "responses": {
                        "200": {"description": "text/html"},
                        "303": {"description": "the code was spent for the cookie"},
                        **_errors(),
                    },
                },
            },
            "/api/chart-codes": {
                "post": {
                    "summary": "a one-time URL of the chart page (valid once, for a minute) for "
                    "a browser, which carries no token",
                    "requestBody": _json_body(bodies.NoFields, required=False),
                    "responses": {
                        "201": _json(_ref(bodies.ChartCode), "the URL"),
                        **_errors(400, 409),
                    },
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


if __name__ == "__main__":
    json.dump(openapi(), sys.stdout, indent=2)
    sys.stdout.write("\n")
