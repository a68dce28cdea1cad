"""Fencing by the lease clock: a host that cannot renew its lease stops its VMs before etcd can
let the lease expire, so that another host may start them without the VM running twice.

The host's own clock bounds etcd's: a keepalive *sent* at time t that etcd answered with TTL s
means the lease lives at least until t + s by etcd's account (etcd counts from when it got the
request, which is after t). So the host must have stopped its VMs by t + s, and it starts
stopping them at t + s - margin, the margin being what stopping all its VMs may take. Pure
logic: monotonic times in, a deadline out; pyhv.cluster.membership runs it on a thread.
"""

from __future__ import annotations

from dataclasses import dataclass


class FencingError(ValueError):
    """A lease TTL and margin that leave no time to renew: the message says what to change."""


@dataclass
class LeaseClock:
    """The last renewal a host is sure of, and when it must fence.

    `ttl_s`: the lease's TTL; `margin_s`: time allowed to stop every VM. Renewals go out every
    `renew_every_s` (a third of what is left after the margin), so two renewals may be lost
    before the host fences."""

    ttl_s: float
    margin_s: float
    renewed_at: float | None = None  # monotonic time the last answered keepalive was sent
    granted_s: float = 0.0  # the TTL etcd answered it with

    def __post_init__(self) -> None:
        if not self.ttl_s > self.margin_s > 0:
            raise FencingError(
                f"lease TTL {self.ttl_s} s must exceed the fencing margin {self.margin_s} s "
                "(the time to stop every VM): raise the TTL or lower the margin"
            )

    @property
    def renew_every_s(self) -> float:
        return (self.ttl_s - self.margin_s) / 3

    def renewed(self, sent_at: float, granted_s: float) -> None:
        """A keepalive sent at `sent_at` was answered with TTL `granted_s` (> 0)."""
        if self.renewed_at is None or sent_at >= self.renewed_at:
            self.renewed_at = sent_at
            self.granted_s = granted_s

    @property
    def expires_at(self) -> float | None:
        """The earliest time etcd may expire the lease (None before the first renewal)."""
        return None if self.renewed_at is None else self.renewed_at + self.granted_s

    @property
    def fence_at(self) -> float | None:
        """When the host must start stopping its VMs if no renewal comes first."""
        e = self.expires_at
        return None if e is None else e - self.margin_s

    def must_fence(self, now: float) -> bool:
        f = self.fence_at
        return f is not None and now >= f
