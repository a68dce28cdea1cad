"""The base of every VSP: an explicit state machine with named states and allowed transitions.

Like QEMU's hv-balloon: one state enum, transitions declared up front, every transition logged
and counted, every refused guest message logged and counted. Tests drive a VSP message by message
through `on_packet` (or `on_message`) and read `state`, `counters` and `history`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Any, Generic, NamedTuple, TypeVar, cast

from pyhv.trace.events import Event, VmbusEvent
from pyhv.vmbus.channel import Channel
from pyhv.vmbus.packet import Packet, PacketType

S = TypeVar("S", bound=Enum)


F = TypeVar("F", bound=Callable[..., Any])


def serialized(method: F) -> F:
    """Run a VSP method under the VSP's lock: guest messages (doorbell thread) and host
    requests (VMMS or VP threads) change one state machine, one at a time. The lock order is
    VSP, then channel: a channel never calls out while holding its own lock."""

    @functools.wraps(method)
    def wrapper(self: Vsp[Any], *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)

    return cast(F, wrapper)


class Transition(NamedTuple):
    old: Enum
    new: Enum
    why: str
    at: float


class VspError(RuntimeError):
    """The host asked a VSP for something its state does not allow (a host bug, not the guest's)."""


class Vsp(Generic[S]):
    """A service provider on one channel.

    Subclasses set `TRANSITIONS` (state -> states it may go to) and `STOPPED`, and implement
    `on_message(payload, trans_id)`. `send(payload)` is the channel's non-blocking write (False
    when the ring is full); what cannot be written waits in an outbox until `flush()`.
    """

    TRANSITIONS: Mapping[Enum, frozenset[Enum]] = {}
    STOPPED: Enum
    #: The flight recorder's `record` while one listens (pyhv.trace), else None: every packet
    #: either way, and the messages `trace_message` decodes from it, go there.
    tracer: Callable[[Event], object] | None = None
    #: Consecutive refused guest messages after which the guest is deemed hopelessly broken.
    MAX_CONSECUTIVE_BAD = 16

    def __init__(
        self,
        name: str,
        initial: S,
        send: Callable[[bytes], bool] | None = None,
        on_stop: Callable[[str], object] | None = None,
    ) -> None:
        self.name = name
        self.log = logging.getLogger(f"pyhv.vsp.{name}")
        self._state: S = initial
        self._send = send
        self._on_stop = on_stop
        self._outbox: deque[bytes] = deque()
        self.counters: Counter[str] = Counter()
        self.history: deque[Transition] = deque(maxlen=256)
        self._bad_in_a_row = 0
        self.stop_reason: str | None = None
        self._channel: Channel | None = None
        self.lock = threading.RLock()

    @property
    def state(self) -> S:
        return self._state

    def attach(self, send: Callable[[bytes], bool]) -> None:
        """Connect to an open channel's write side."""
        self._send = send
        self.flush()

    @serialized
    def bind(self, channel: Channel) -> None:
        """Serve an open channel: its packets come here, our messages go to its ring, and a
        closed channel stops the VSP (a stopped VSP closes its channel). Binding a new channel
        (the guest reopened the offer, e.g. after a reboot) calls `on_bind` first."""
        self.on_bind(channel)
        self._channel = channel
        channel.on_packet = self.on_packet
        channel.on_writable = self.flush

        def closed(why: str) -> None:
            if self._channel is channel:  # an old channel closing late stops nothing
                self.stop(f"channel closed: {why}")

        channel.close_listeners.append(closed)
        self.attach(lambda payload: channel.try_send(payload))

    def on_bind(self, channel: Channel) -> None:
        """Hook: start the protocol over for a new channel."""

    def _to(self, new: S, why: str) -> None:
        old = self._state
        if new not in self.TRANSITIONS.get(old, frozenset()) and new is not self.STOPPED:
            raise VspError(f"{self.name}: no transition {old.name} -> {new.name} ({why})")
        self._state = new
        self.history.append(Transition(old, new, why, time.monotonic()))
        self.counters["transitions"] += 1
        self.counters[f"{old.name}->{new.name}"] += 1
        self.log.info("%s: %s -> %s: %s", self.name, old.name, new.name, why)

    def refuse(self, why: str) -> None:
        """A guest message was wrong: log, count, and stop if the guest keeps sending garbage."""
        self.counters["refused"] += 1
        self._bad_in_a_row += 1
        self.log.warning("%s: refused in %s: %s", self.name, self._state.name, why)
        if self._bad_in_a_row >= self.MAX_CONSECUTIVE_BAD and self._state is not self.STOPPED:
            self.stop(f"{self._bad_in_a_row} bad messages in a row; last: {why}")

    def accepted(self) -> None:
        self.counters["accepted"] += 1
        self._bad_in_a_row = 0

    @serialized
    def stop(self, why: str) -> None:
        """Stop serving the channel (the guest is broken or the channel is going away)."""
        if self._state is self.STOPPED:
            return
        self.stop_reason = why
        self._to(self.STOPPED, why)  # type: ignore[arg-type]
        self._outbox.clear()
        if self._channel is not None:
            self._channel.close(f"{self.name} stopped: {why}")
        if self._on_stop is not None:
            self._on_stop(why)

    @property
    def stopped(self) -> bool:
        return self._state is self.STOPPED

    @serialized
    def post(self, payload: bytes) -> None:
        """Queue a message for the guest and write what the ring has room for."""
        self._outbox.append(payload)
        self.counters["queued"] += 1
        self.flush()

    @serialized
    def flush(self) -> int:
        """Write queued messages until the ring is full; returns how many were written."""
        n = 0
        while self._outbox and self._send is not None:
            if not self._send(self._outbox[0]):
                self.counters["ring_full"] += 1
                break
            sent = self._outbox.popleft()
            if self.tracer is not None:
                self._trace(self.tracer, "host->guest", sent, PacketType.DATA_INBAND, 0)
            n += 1
        self.counters["sent"] += n
        return n

    @property
    def outbox_len(self) -> int:
        return len(self._outbox)

    @serialized
    def on_packet(self, packet: Packet) -> None:
        """Entry point from the channel: one packet read from the guest->host ring."""
        self.counters["packets"] += 1
        if self.tracer is not None:
            self._trace(self.tracer, "guest->host", packet.payload, packet.type, packet.trans_id)
        if self._state is self.STOPPED:
            self.counters["after_stop"] += 1
            return
        if packet.type != PacketType.DATA_INBAND:
            self.refuse(f"packet type {packet.type} where only inband data is used")
            return
        self.on_message(packet.payload, packet.trans_id)

    def on_message(self, payload: bytes, trans_id: int) -> None:
        raise NotImplementedError

    def _trace(
        self,
        record: Callable[[Event], object],
        direction: str,
        payload: bytes,
        ptype: int,
        trans_id: int,
    ) -> None:
        record(
            VmbusEvent(time.time(), -1, self.name, direction, int(ptype), len(payload), trans_id)
        )
        for event in self.trace_message(direction, payload):
            record(event)

    def trace_message(self, direction: str, payload: bytes) -> list[Event]:
        """Hook: the protocol's own events for one packet's payload (none by default)."""
        return []
