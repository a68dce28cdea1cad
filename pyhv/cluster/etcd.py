"""The cluster store: a small typed client for etcd v3 through its JSON gateway (the
`/v3/kv/*`, `/v3/lease/*` and `/v3/watch` routes that etcd 3.4 serves on its client URL), over
httpx. Keys and values are bytes on the wire (base64 in the gateway's JSON) and str here.

Only what the cluster needs: read a key or a prefix, put (optionally under a lease), delete,
one compare-and-swap transaction (`swap`), leases (grant, keep alive once, revoke) and a watch
of a prefix. Every failure to reach etcd is an `EtcdUnavailable` naming the endpoints tried and
what to check; an answer etcd gives as an error is an `EtcdError` with etcd's own words.

Revisions: every write gets the store's next revision; a key's `mod_revision` is the revision
of its last write, which is what ownership uses as a fencing token (pyhv.cluster.ownership).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

#: How long one request may take before etcd counts as unreachable (a lease keeper passes less).
DEFAULT_TIMEOUT_S = 5.0


class EtcdError(RuntimeError):
    """etcd answered, with an error (its message is kept)."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time: etcd is down, paused or cut off."""


def _b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


def _unb64(text: str | None) -> str:
    return base64.b64decode(text or "").decode()


def prefix_end(prefix: str) -> bytes:
    """The range end that selects every key starting with `prefix` (etcd's rule: the prefix
    with its last byte plus one)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw)
        raw.pop()
    return b"\0"


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd holds it. `mod_revision` is the revision of its last write; `lease` the
    lease it lives under (0: none)."""

    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    @classmethod
    def _from(cls, kv: dict[str, Any]) -> KeyValue:
        return cls(
            key=_unb64(kv.get("key")),
            value=_unb64(kv.get("value")),
            create_revision=int(kv.get("create_revision", 0)),
            mod_revision=int(kv.get("mod_revision", 0)),
            version=int(kv.get("version", 0)),
            lease=int(kv.get("lease", 0)),
        )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A put or a delete seen by a watch (a delete carries the key and its revision only)."""

    kind: str  # "put" or "delete"
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class SwapResult:
    """A compare-and-swap's outcome: `succeeded`, the store's revision after it, and the key's
    current entry when it failed (None if the key does not exist)."""

    succeeded: bool
    revision: int
    current: KeyValue | None = None


class Etcd:
    """A client for one etcd cluster (`endpoints`: http://host:port, tried in order)."""

    def __init__(self, endpoints: Sequence[str] | str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if isinstance(endpoints, str):
            endpoints = parse_endpoints(endpoints)
        if not endpoints:
            raise ValueError("no etcd endpoint given: pass http://HOST:PORT[,http://HOST:PORT]")
        self.endpoints = tuple(endpoints)
        self.timeout = timeout
        self._http = httpx.Client(timeout=timeout)
        self._preferred = 0

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- transport ------------------------------------------------------------------------

    def _post(self, path: str, body: dict[str, Any], timeout: float | None = None) -> Any:
        """POST to the first endpoint that answers; EtcdUnavailable if none does."""
        failures = []
        n = len(self.endpoints)
        for i in range(n):
            index = (self._preferred + i) % n
            url = self.endpoints[index] + path
            try:
                r = self._http.post(url, json=body, timeout=timeout or self.timeout)
            except httpx.HTTPError as e:
                failures.append(f"{self.endpoints[index]}: {type(e).__name__} {e}".rstrip())
                continue
            self._preferred = index
            try:
                data = r.json()
            except ValueError:
                raise EtcdError(f"etcd at {url} answered {r.status_code} without JSON") from None
            if r.status_code != 200 or "error" in data:
                raise EtcdError(
                    f"etcd refused {path}: {data.get('message') or data.get('error') or r.status_code}"
                )
            return data
        raise EtcdUnavailable(
            f"etcd did not answer ({'; '.join(failures)}): check that etcd runs and is "
            "reachable at --cluster's endpoints"
        )

    # --- keys -----------------------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        kvs = self._post("/v3/kv/range", {"key": _b64(key)}).get("kvs", [])
        return KeyValue._from(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str) -> tuple[list[KeyValue], int]:
        """Every key under `prefix` (sorted by key) and the store's revision they were read at."""
        data = self._post(
            "/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        )
        return [KeyValue._from(kv) for kv in data.get("kvs", [])], int(
            data["header"].get("revision", 0)
        )

    def put(self, key: str, value: str, lease: int = 0) -> int:
        """Write `key`; the revision of the write."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("/v3/kv/put", body)["header"]["revision"])

    def delete(self, key: str, *, prefix: bool = False) -> int:
        """Delete `key` (or every key under it); how many were deleted."""
        body = {"key": _b64(key)}
        if prefix:
            body["range_end"] = _b64(prefix_end(key))
        return int(self._post("/v3/kv/deleterange", body).get("deleted", 0))

    def swap(self, key: str, value: str | None, mod_revision: int, lease: int = 0) -> SwapResult:
        """Compare-and-swap: write `value` (None: delete the key) only if the key's mod revision
        is still `mod_revision` (0: only if the key does not exist)."""
        compare = {"key": _b64(key), "target": "MOD", "result": "EQUAL"}
        compare["mod_revision"] = str(mod_revision)
        op: dict[str, Any]
        if value is None:
            op = {"request_delete_range": {"key": _b64(key)}}
        else:
            put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
            if lease:
                put["lease"] = str(lease)
            op = {"request_put": put}
        data = self._post(
            "/v3/kv/txn",
            {
                "compare": [compare],
                "success": [op],
                "failure": [{"request_range": {"key": _b64(key)}}],
            },
        )
        revision = int(data["header"]["revision"])
        if data.get("succeeded"):
            return SwapResult(True, revision)
        kvs = data["responses"][0]["response_range"].get("kvs", [])
        return SwapResult(False, revision, KeyValue._from(kvs[0]) if kvs else None)

    # --- leases ---------------------------------------------------------------------------

    def grant(self, ttl_s: int) -> int:
        """A new lease of `ttl_s` seconds; its id."""
        data = self._post("/v3/lease/grant", {"TTL": int(ttl_s)})
        return int(data["ID"])

    def keepalive(self, lease: int, timeout: float | None = None) -> int:
        """Renew `lease` once; the TTL etcd granted again (0: the lease has expired)."""
        data = self._post("/v3/lease/keepalive", {"ID": str(lease)}, timeout=timeout)
        return int(data.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End `lease` and delete every key under it (a lease already gone is no error)."""
        try:
            self._post("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdUnavailable:
            raise
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    # --- watch ----------------------------------------------------------------------------

    def watch(
        self, prefix: str, start_revision: int = 0, timeout: float | None = None
    ) -> Iterator[WatchEvent]:
        """Events on keys under `prefix` from `start_revision` (0: from now), as they come.
        The stream ends (EtcdUnavailable) when no event came within `timeout` seconds or etcd
        went away; the caller watches again from the revision after the last event it saw."""
        request: dict[str, Any] = {
            "key": _b64(prefix),
            "range_end": _b64(prefix_end(prefix)),
        }
        if start_revision:
            request["start_revision"] = str(start_revision)
        url = self.endpoints[self._preferred] + "/v3/watch"
        read = httpx.Timeout(self.timeout, read=timeout)
        try:
            with self._http.stream(
                "POST", url, json={"create_request": request}, timeout=read
            ) as r:
                for line in r.iter_lines():
                    if not line.strip():
                        continue
                    result = json.loads(line).get("result", {})
                    for ev in result.get("events", []):
                        kind = "delete" if ev.get("type") == "DELETE" else "put"
                        yield WatchEvent(kind, KeyValue._from(ev.get("kv", {})))
        except httpx.HTTPError as e:
            raise EtcdUnavailable(f"watch of {prefix!r} at {url} ended: {e}") from None


def parse_endpoints(text: str) -> list[str]:
    """`--cluster` as given: comma-separated http://HOST:PORT (or HOST:PORT) endpoints."""
    out = []
    for part in text.split(","):
        part = part.strip().rstrip("/")
        if not part:
            continue
        if "://" not in part:
            part = "http://" + part
        scheme, _, rest = part.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme not in ("http", "https") or not host or not port.isdigit():
            raise ValueError(
                f"etcd endpoint {part!r} is not http://HOST:PORT: give e.g. http://127.0.0.1:2379"
            )
        out.append(part)
    if not out:
        raise ValueError("no etcd endpoint given: pass http://HOST:PORT[,http://HOST:PORT]")
    return out
