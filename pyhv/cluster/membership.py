"""A host in the cluster: what `pyhv vmms serve --cluster ENDPOINTS --host NAME` starts beside
the VMMS. The one hook between the VMMS and the cluster (the VMMS only calls `HostAgent.start`
and `close`; the agent reads the VMMS through `host()`, `list()` and `stop()`).

- Join: a lease of `ttl_s` seconds, and the host's record (pyhv.cluster.records.HostRecord)
  under it; a host name another live host holds is refused.
- Liveness: a thread renews the lease every third of (TTL - margin), retrying within a quarter
  second after a failure, and publishes the host's
  capacity (the VMMS's pool: budget, free above the reserve, its VMs and their pressure) every
  `publish_every_s`.
- Fencing (pyhv.cluster.fencing): a second thread watches the lease clock; when no renewal was
  answered in time it stops every running VM before etcd can expire the lease. Once etcd answers
  again the host joins with a new lease; the VMs it stopped stay off (HA restart decides where
  they run next).
- Starting a VM (a guard on the VMMS's start): a host without a live lease starts nothing, and
  a VM the cluster knows (/pyhv/vms/<vm>/config) starts only on the host its owner key names;
  starting it records its desired state `running`, stopping it by hand `off` (HA restart
  restarts only VMs that should run; fencing's stops leave it `running`).
- Leave: on close the lease is revoked, so the record goes at once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import msgspec

from pyhv.cluster import ownership
from pyhv.cluster.etcd import Etcd, EtcdError
from pyhv.cluster.fencing import LeaseClock
from pyhv.cluster.records import (
    HOSTS,
    HostRecord,
    PressureSummary,
    RecordError,
    VmRecord,
    VmSummary,
    decode,
    encode,
    host_key,
    vm_config_key,
)
from pyhv.counters.registry import CounterDef, CounterSetDef
from pyhv.dynmem.balancer import PAGE_SIZE
from pyhv.dynmem.status import target_pages
from pyhv.vmms.inventory import Conflict, VmmsError

log = logging.getLogger("pyhv.cluster")


class PeerRefused(VmmsError):
    """A peer host's request (the cluster token) for a VM or destination outside the cluster."""

    status = 403


#: Test hook (with PYHV_TEST_HOOKS=1): a directory where a start, between reading the VM's owner
#: and confirming it, writes VM.read and waits for VM.go: a test moves the owner meanwhile.
HOLD_START_ENV = "PYHV_TEST_HOLD_START"


def _test_hold(vm: str) -> None:
    hold = os.environ.get(HOLD_START_ENV) if os.environ.get("PYHV_TEST_HOOKS") == "1" else None
    if not hold:
        return
    (Path(hold) / f"{vm}.read").touch()
    deadline = time.monotonic() + 60
    while not (Path(hold) / f"{vm}.go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


DEFAULT_TTL_S = 5
DEFAULT_MARGIN_S = 2.5
DEFAULT_PUBLISH_S = 2.0
#: After a failed renewal, the next one goes out this soon (from the failed one's start).
RETRY_S = 0.25


#: The host's side of the cluster, in the VMMS's counters (/metrics, the chart page).
HOST_SET = CounterSetDef(
    "pyhv Cluster Host",
    (
        CounterDef("Lease Renewals", "lease keepalives etcd answered", "count", "cumulative"),
        CounterDef(
            "Lease Renewals Failed", "keepalives etcd did not answer", "count", "cumulative"
        ),
        CounterDef("Records Published", "host records written to etcd", "count", "cumulative"),
        CounterDef(
            "Fencings",
            "times the host stopped its VMs for a lease it could not renew",
            "count",
            "cumulative",
        ),  # fmt: skip
        CounterDef("VMs Fenced", "VMs stopped by fencing", "count", "cumulative"),
        CounterDef(
            "Seconds Before Fencing",
            "time left until the host fences itself without a renewal (0: not in the cluster)",
            "seconds",
        ),  # fmt: skip
    ),
    instance_label=None,
    prometheus_name="pyhv_cluster_host",
)


class JoinError(RuntimeError):
    """The host could not join: the message says why and what to do."""


class HostVmms(Protocol):
    """What the agent needs of the VMMS (pyhv.vmms.service.Vmms has it)."""

    def host(self) -> dict[str, int]: ...

    def list(self) -> list[dict[str, Any]]: ...

    def stop(self, name: str) -> dict[str, Any]: ...


@dataclass
class FenceRecord:
    """One fencing: when (monotonic), which VMs were stopped, how long before expiry."""

    at: float
    vms: list[str]
    before_expiry_s: float


def host_record(
    name: str,
    vmms: HostVmms,
    api: str,
    migration: str,
    last_decision: Any = None,
    fingerprint: str = "",
) -> HostRecord:
    """The host's record from its VMMS's pool and VMs (what `publish` writes)."""
    pool = vmms.host()
    vms = []
    pressures = []
    for vm in vmms.list():
        memory = vm.get("memory")
        if vm.get("state") not in ("running", "starting") or memory is None:
            continue
        s = vm["settings"]
        demand = memory.get("demand")
        assigned = int(memory["assigned"])
        dynamic = bool(s.get("dynamic_memory"))
        minimum = int(s["minimum"] if dynamic else s["memory"])
        maximum = int(s["maximum"] if dynamic else s["memory"])
        target = assigned
        if demand is not None and dynamic:
            target = PAGE_SIZE * int(
                target_pages(
                    int(demand) // PAGE_SIZE,
                    int(s["buffer"]),
                    minimum // PAGE_SIZE,
                    maximum // PAGE_SIZE,
                )
            )
        if demand is not None and assigned:
            pressures.append(demand * 100.0 / assigned)
        vms.append(
            VmSummary(
                name=vm["name"],
                assigned=assigned,
                startup=int(s["memory"]),
                minimum=minimum,
                maximum=maximum,
                demand=None if demand is None else int(demand),
                target=target,
            )
        )
    short = bool(getattr(last_decision, "host_short", False))
    return HostRecord(
        name=name,
        api=api,
        migration=migration,
        total=int(pool["budget"]),
        free=int(pool["free"]),
        reserve=int(pool["reserve"]),
        vms=vms,
        pressure=PressureSummary(
            average=sum(pressures) / len(pressures) if pressures else 0.0,
            highest=max(pressures, default=0.0),
            short=short,
        ),
        fingerprint=fingerprint,
        published=time.time(),
    )


@dataclass
class HostAgent:
    """Keeps host `name` in the cluster while its VMMS runs."""

    etcd: Etcd
    name: str
    vmms: HostVmms
    api: str = ""
    migration: str = "127.0.0.1"
    ttl_s: int = DEFAULT_TTL_S
    margin_s: float = DEFAULT_MARGIN_S
    publish_every_s: float = DEFAULT_PUBLISH_S
    #: What the VMMS's host balancer decided last (for the pressure summary), or None.
    last_decision: Callable[[], Any] = lambda: None
    lease: int = 0
    #: Its TLS certificate's SHA-256 ("" when its API is plain HTTP).
    fingerprint: str = ""
    fences: list[FenceRecord] = field(default_factory=list)
    #: Set each time the host fenced itself (tests and the log wait on it).
    fenced: threading.Event = field(default_factory=threading.Event)
    #: Called first on close (the standing leader's close: it resigns before the lease goes).
    on_close: list[Callable[[], object]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.clock = LeaseClock(float(self.ttl_s), self.margin_s)
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._published_at = 0.0
        self._stale_lease = 0
        self.counts = dict.fromkeys(
            (
                "Lease Renewals",
                "Lease Renewals Failed",
                "Records Published",
                "Fencings",
                "VMs Fenced",
            ),
            0,
        )
        registry = getattr(self.vmms, "registry", None)
        self._counters = None if registry is None else registry.register(HOST_SET)
        self._fencing = False
        guards = getattr(self.vmms, "start_guards", None)
        if guards is not None:
            guards.append(self.guard_start)
            self.vmms.stop_listeners.append(self._stopped)  # type: ignore[attr-defined]
            self.vmms.peer_guard = self.guard_peer  # type: ignore[attr-defined]

    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n
        if self._counters is not None:
            fence_at = self.clock.fence_at
            left = 0.0 if fence_at is None else max(0.0, fence_at - time.monotonic())
            self._counters.update({**self.counts, "Seconds Before Fencing": round(left, 2)})

    # --- join and leave -----------------------------------------------------------------

    def start(self) -> None:
        """Join (JoinError if etcd is unreachable or the name is taken), then keep the lease
        and watch the fence on threads of their own."""
        try:
            self._join()
        except EtcdError as e:
            raise JoinError(f"host {self.name!r} cannot join the cluster: {e}") from None
        for target, what in ((self._keep, "lease"), (self._watch_fence, "fence")):
            t = threading.Thread(target=target, name=f"cluster-{what}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "host %s joined the cluster at %s (lease %x, TTL %d s)",
            self.name,
            ",".join(self.etcd.endpoints),
            self.lease,
            self.ttl_s,
        )

    def _join(self) -> None:
        if self._stale_lease:
            # The lease this host fenced itself for: end it, so the name is free to take again.
            self.etcd.revoke(self._stale_lease)
            self._stale_lease = 0
        sent = time.monotonic()
        lease = self.etcd.grant(self.ttl_s)
        result = self.etcd.swap(host_key(self.name), self._record(), 0, lease=lease)
        if not result.succeeded:
            self.etcd.revoke(lease)
            raise JoinError(
                f"host name {self.name!r} is held by a live host in the cluster: pick another "
                "--host, or wait for its lease to expire"
            )
        with self._cond:
            self.lease = lease
            self.clock = LeaseClock(float(self.ttl_s), self.margin_s)
            self.clock.renewed(sent, float(self.ttl_s))
            self._published_at = sent
            self._cond.notify_all()

    def close(self) -> None:
        """Leave: stop the threads and revoke the lease (the host record goes with it)."""
        for f in self.on_close:
            f()
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        for t in self._threads:
            t.join(self.etcd.timeout + 1)
        if self.lease:
            try:
                self.etcd.revoke(self.lease)
                log.info("host %s left the cluster", self.name)
            except EtcdError as e:
                log.warning(
                    "host %s could not revoke its lease (it expires by itself): %s", self.name, e
                )

    # --- the lease and the record -------------------------------------------------------

    def _record(self) -> str:
        return encode(
            host_record(
                self.name,
                self.vmms,
                self.api,
                self.migration,
                self.last_decision(),
                self.fingerprint,
            )
        )

    def publish(self) -> None:
        """Write the host's record now (under its lease)."""
        self.etcd.put(host_key(self.name), self._record(), lease=self.lease)
        self._published_at = time.monotonic()
        self._count("Records Published")

    def _keep(self) -> None:
        # Renewals go out every renew_every_s from the last one's start; after a failure the
        # next goes out RETRY_S later, so a short outage (etcd restarting) costs no fencing.
        next_at = time.monotonic() + self.clock.renew_every_s
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            sent = time.monotonic()
            next_at = sent + RETRY_S
            try:
                if not self.lease:
                    self._join()
                    next_at = sent + self.clock.renew_every_s
                    continue
                ttl = self.etcd.keepalive(self.lease, timeout=self.clock.renew_every_s)
                if ttl <= 0:
                    log.warning("host %s: lease %x expired; joining again", self.name, self.lease)
                    self.lease = 0
                    self._join()
                    next_at = sent + self.clock.renew_every_s
                    continue
                with self._cond:
                    self.clock.renewed(sent, float(ttl))
                    self._cond.notify_all()
                self._count("Lease Renewals")
                next_at = sent + self.clock.renew_every_s
                if time.monotonic() - self._published_at >= self.publish_every_s:
                    self.publish()
            except (EtcdError, JoinError) as e:
                log.warning("host %s: lease not renewed: %s", self.name, e)
                self._count("Lease Renewals Failed")
            except Exception:  # noqa: BLE001 - the keeper must outlive a bad VMMS answer
                log.exception("host %s: renewing the lease failed", self.name)

    # --- starting and stopping VMs -------------------------------------------------------

    def guard_start(self, vm: str) -> None:
        """Conflict unless this host may start `vm` now: it holds a lease it has not fenced
        itself for, and a VM of the cluster is owned by this host (its fencing token is
        current). A cluster VM's desired state becomes `running`."""
        fence_at = self.clock.fence_at
        if not self.lease or fence_at is None or time.monotonic() >= fence_at:
            raise Conflict(
                f"VM {vm!r} cannot start: host {self.name} holds no lease in the cluster (cut "
                "off from etcd, or fenced); it starts no VM until it has joined again"
            )
        try:
            kv = self.etcd.get(vm_config_key(vm))
            if kv is None:
                return  # not a VM of the cluster: this host's own
            held = ownership.owner(self.etcd, vm)
            if held is None or held.host != self.name:
                raise Conflict(
                    f"VM {vm!r} cannot start on host {self.name}: the cluster gives it to "
                    f"{held.host if held else 'no host'}"
                    + (f" (token {held.token})" if held else "")
                    + ": start it there"
                )
            _test_hold(vm)
            try:
                # The owner read above may be stale by now: only a compare-and-swap against it
                # proves it is not, and advancing the token makes any move planned with the
                # old one fail (pyhv.cluster.ownership.confirm).
                held = ownership.confirm(self.etcd, held)
            except ownership.OwnershipConflict as e:
                log.warning("VM %s not started: %s", vm, e)
                raise Conflict(f"VM {vm!r} cannot start: {e}") from None
            if time.monotonic() >= fence_at:
                raise Conflict(f"VM {vm!r} cannot start: host {self.name} fenced itself meanwhile")
            self._set_desired(vm, "running")
        except EtcdError as e:
            raise Conflict(
                f"VM {vm!r} cannot start: the cluster's store does not answer ({e}); try again"
            ) from None

    def guard_peer(self, vm: str, destination: str | None = None) -> None:
        """PeerRefused (403) unless a peer host holding the cluster token may act on `vm`: a VM
        of the cluster that its owner key gives this host, moved (`destination`, HOST:PORT)
        only to another live host's API. The token is scoped by route (pyhv.vmms.auth); this
        binds it to the cluster's own VMs and hosts."""
        try:
            if self.etcd.get(vm_config_key(vm)) is None:
                raise PeerRefused(
                    f"VM {vm!r} is not a VM of the cluster: the cluster token acts only on those"
                )
            held = ownership.owner(self.etcd, vm)
            if held is None or held.host != self.name:
                raise PeerRefused(
                    f"VM {vm!r} is given to {held.host if held else 'no host'}, not to "
                    f"{self.name}: the cluster token acts only on VMs the cluster gives this host"
                )
            if destination is not None:
                apis = set()
                for kv in self.etcd.get_prefix(HOSTS)[0]:
                    try:
                        rec = decode(kv.key, kv.value, HostRecord)
                    except RecordError:
                        continue
                    if rec.name != self.name and rec.api:
                        apis.add(rec.api)
                if destination not in apis:
                    raise PeerRefused(
                        f"destination {destination!r} is not the API of a live host of the "
                        "cluster: the cluster token moves VMs only between its hosts"
                    )
        except EtcdError as e:
            raise Conflict(f"the cluster's store does not answer ({e}); try again") from None

    def _stopped(self, vm: str) -> None:
        if self._fencing:
            return  # fenced, not stopped by hand: it should still run (HA restart's decision)
        try:
            held = ownership.owner(self.etcd, vm)
            if held is not None and held.host == self.name:
                self._set_desired(vm, "off")
        except EtcdError as e:
            log.warning("VM %s stopped; its desired state not recorded in the cluster: %s", vm, e)

    def _set_desired(self, vm: str, desired: str) -> None:
        key = vm_config_key(vm)
        for _ in range(10):
            kv = self.etcd.get(key)
            if kv is None:
                return
            rec = decode(key, kv.value, VmRecord)
            if rec.desired == desired:
                return
            new = msgspec.structs.replace(rec, desired=desired, generation=rec.generation + 1)
            if self.etcd.swap(key, encode(new), kv.mod_revision).succeeded:
                return

    # --- fencing ------------------------------------------------------------------------

    def _watch_fence(self) -> None:
        with self._cond:
            while not self._stop.is_set():
                fence_at = self.clock.fence_at
                now = time.monotonic()
                if fence_at is None or now < fence_at:
                    self._cond.wait(None if fence_at is None else fence_at - now)
                    continue
                expires = self.clock.expires_at or now
                # Fenced for this lease: wait for the next one (a new join resets the clock).
                self.clock.renewed_at = None
                self._stale_lease, self.lease = self.lease, 0
                self._cond.release()
                try:
                    self._fence(expires)
                finally:
                    self._cond.acquire()

    def _fence(self, expires_at: float) -> None:
        running = [
            vm["name"] for vm in self.vmms.list() if vm.get("state") in ("running", "starting")
        ]
        log.error(
            "host %s: lease not renewed for %.1f s: stopping its %d VMs before the lease can "
            "expire (fencing)",
            self.name,
            self.ttl_s - self.margin_s,
            len(running),
        )

        def stop(vm: str) -> None:
            try:
                self.vmms.stop(vm)
            except Exception as e:  # noqa: BLE001 - a VM that ended meanwhile is fenced too
                log.warning("fencing: stopping %s: %s", vm, e)

        # All at once: the margin is for stopping every VM, not each in turn.
        stoppers = [
            threading.Thread(target=stop, args=(vm,), name=f"fence-{vm}", daemon=True)
            for vm in running
        ]
        self._fencing = True
        try:
            for t in stoppers:
                t.start()
            for t in stoppers:
                t.join()
        finally:
            self._fencing = False
        left = expires_at - time.monotonic()
        self.fences.append(FenceRecord(time.monotonic(), running, left))
        self.counts["VMs Fenced"] += len(running)
        self._count("Fencings")
        log.error(
            "host %s fenced: %d VMs stopped %.2f s before the lease could expire",
            self.name,
            len(running),
            left,
        )
        self.fenced.set()


def join(
    endpoints: str,
    host: str,
    vmms: HostVmms,
    *,
    api: str = "",
    migration: str = "127.0.0.1",
    ttl_s: int = DEFAULT_TTL_S,
    last_decision: Callable[[], Any] = lambda: None,
    fingerprint: str = "",
) -> HostAgent:
    """What `pyhv vmms serve --cluster ENDPOINTS --host NAME` calls: the host joins and stays
    in the cluster until `close()`. JoinError (with the remedy) if it cannot."""
    from pyhv.cluster.fencing import FencingError
    from pyhv.cluster.records import check_host_name

    # httpx logs every request at INFO: a renewal a second would drown the VMMS's log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        etcd = Etcd(endpoints, timeout=max(1.0, ttl_s / 3))
        check_host_name(host)
        margin = min(DEFAULT_MARGIN_S, ttl_s / 2)
        agent = HostAgent(
            etcd, host, vmms, api, migration, ttl_s, margin, last_decision=last_decision,
            fingerprint=fingerprint,
        )  # fmt: skip
    except (ValueError, FencingError) as e:
        raise JoinError(str(e)) from None
    agent.start()
    return agent
