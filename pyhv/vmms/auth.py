"""Who an API request over TCP comes from: a bearer token in the ``Authorization`` header (the
admin token, a migration token that can only bring a VM in, or a cluster token that can only
place a VM here), or the chart page's short-lived
cookie, got by exchanging a one-time code. Tokens in URLs are refused: URLs end up in logs,
shell history and browser history. The Unix socket needs none of this: its file permissions
admit only its owner (pyhv.vmms.server).

Scopes: ``admin`` may do everything; ``migrate`` only what the destination side of a live
migration needs (pyhv.vmms.api lists those routes); ``cluster`` only what the cluster's
placement, HA restart and balancer moves need from a peer host (create a VM, start it, migrate
it out and follow that migration: not delete, not stop, not the console); ``chart`` only reads the counters for the
chart page."""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from pyhv.vmms.store import write_atomically

ADMIN, MIGRATE, CLUSTER, CHART = "admin", "migrate", "cluster", "chart"
SCOPES = (ADMIN, MIGRATE, CLUSTER, CHART)

#: The chart page's cookie.
COOKIE = "pyhv_chart"
#: How long a one-time chart code may wait to be exchanged, and how long its cookie lasts (s).
CODE_TTL = 60.0
COOKIE_TTL = 3600.0
#: At most this many codes and cookies are held (the oldest go first).
MAX_CODES = 64
MAX_SESSIONS = 256

_TOKEN_FILES = {ADMIN: "token", MIGRATE: "migration-token", CLUSTER: "cluster-token"}


class AuthError(Exception):
    """A request refused for who it is from: 401 (not known) or 403 (known, not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def token_path(state_dir: Path, scope: str) -> Path:
    """Where `pyhv vmms serve` keeps the token of `scope` (``token``, ``migration-token``,
    ``cluster-token``)."""
    return Path(state_dir) / _TOKEN_FILES[scope]


def read_token(path: Path, what: str) -> str:
    """A token from a file (surrounding whitespace dropped); AuthError(0) naming the file."""
    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise AuthError(0, f"cannot read {what} from {path}: {e}") from None
    if len(token) < 16:
        raise AuthError(
            0, f"{what} in {path} is {len(token)} characters: use at least 16 random ones"
        )
    return token


def load_or_make_token(path: Path) -> str:
    """The token in `path` (0600), made on first use."""
    path = Path(path)
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token
    token = secrets.token_urlsafe(32)
    write_atomically(path, token + "\n", 0o600)
    return token


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class Authenticator:
    """The tokens of one VMMS's TCP API, and the chart page's codes and cookies."""

    def __init__(self, admin: str, migrate: str, cluster: str | None = None) -> None:
        if _same(admin, migrate):
            raise AuthError(0, "the migration token must differ from the admin token")
        if cluster is not None and (_same(cluster, admin) or _same(cluster, migrate)):
            raise AuthError(0, "the cluster token must differ from the admin and migration tokens")
        self._tokens = {ADMIN: admin, MIGRATE: migrate}
        if cluster is not None:
            self._tokens[CLUSTER] = cluster
        self._lock = threading.Lock()
        self._codes: OrderedDict[str, float] = OrderedDict()  # code -> expiry (monotonic)
        self._sessions: OrderedDict[str, float] = OrderedDict()  # cookie -> expiry

    def scope_of(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> str:
        """The scope of a request from its header, or its chart cookie; AuthError(401). (A
        token in the URL is refused before: pyhv.vmms.api.)"""
        given = headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if given:
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthError(401, f"Authorization scheme {scheme!r}: send 'Bearer <token>'")
            value = value.strip()
            for scope, token in self._tokens.items():
                if _same(value, token):
                    return scope
            raise AuthError(
                401,
                "a wrong bearer token: send 'Authorization: Bearer <token>' with a token this "
                "VMMS wrote to its state directory ('token'; 'migration-token' for migrations, "
                "'cluster-token' for the cluster's placement)",
            )
        cookie = cookies.get(COOKIE)
        if cookie:
            if self._session_valid(cookie):
                return CHART
            raise AuthError(
                401, "the chart page's cookie has expired: `pyhv vmms chart` prints a new URL"
            )
        raise AuthError(
            401,
            "no bearer token: send 'Authorization: Bearer <token>' with the token the VMMS wrote "
            "to its state directory (file 'token')",
        )

    # --- the chart page ------------------------------------------------------------------

    def new_code(self) -> str:
        """A one-time code for the chart page, valid CODE_TTL seconds."""
        code = secrets.token_urlsafe(24)
        with self._lock:
            self._expire(self._codes)
            self._codes[code] = time.monotonic() + CODE_TTL
            while len(self._codes) > MAX_CODES:
                self._codes.popitem(last=False)
        return code

    def exchange(self, code: str) -> str:
        """The cookie for a one-time `code` (spent now); AuthError(401) for any other."""
        with self._lock:
            self._expire(self._codes)
            known = next((c for c in self._codes if _same(c, code)), None)
            if known is None:
                raise AuthError(
                    401,
                    "this chart code is spent, expired or unknown (each is good once, for "
                    f"{CODE_TTL:g} s): `pyhv vmms chart` prints a new URL",
                )
            del self._codes[known]
            cookie = secrets.token_urlsafe(32)
            self._expire(self._sessions)
            self._sessions[cookie] = time.monotonic() + COOKIE_TTL
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
            return cookie

    def _session_valid(self, cookie: str) -> bool:
        with self._lock:
            self._expire(self._sessions)
            return any(_same(c, cookie) for c in self._sessions)

    @staticmethod
    def _expire(table: OrderedDict[str, float]) -> None:
        now = time.monotonic()
        for key in [k for k, t in table.items() if t <= now]:
            del table[key]
