"""The migration stream against a man in the middle (a TCP proxy between two hosts' workers,
tests.support.hostile.StreamRelay): a page altered on the way after the handshake, even with the
old xxh3 check recomputed, makes the migration fail and the VM run on at the source; a reply
altered on its way back is refused by the source and counted; with encryption the guest's
memory crosses the wire unreadable, and arrives whole (RAM checksum at pause) and running."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from pyhv.counters import CounterRegistry
from pyhv.migration import MigrationError
from pyhv.migration.stream import Frame
from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved, wait_rising
from tests.support.hostile import StreamRelay

pytestmark = pytest.mark.guest


@pytest.fixture
def middle(hosts: Any) -> Iterator[Callable[..., tuple[Any, Any, Any, StreamRelay]]]:
    """middle(tamper=None) -> (source worker, its guest, destination, the relay between)."""
    made: list[StreamRelay] = []

    def make(tamper: tuple[str, Frame] | None = None) -> tuple[Any, Any, Any, StreamRelay]:
        src, guest = hosts.boot()
        dst = hosts.destination()
        made.append(StreamRelay(dst.wait_listening(), tamper=tamper))
        return src, guest, dst, made[-1]

    yield make
    for r in made:
        r.close()


def _still_running_here(src: Any, guest: Any) -> None:
    assert src.end is None
    first, later = wait_rising(guest.ticks)
    assert later > first
    assert "visible: 128 MiB" in guest.run("mem")


def test_a_page_altered_on_the_way_fails_the_migration_and_the_vm_runs_on_here(
    middle: Any,
) -> None:
    src, guest, dst, relay = middle(("to_destination", Frame.PAGES))
    with pytest.raises(MigrationError) as err:
        migrate_worker(src, relay.address, TOKEN, {"timeout": 10.0})
    assert relay.tampered.is_set()
    _still_running_here(src, guest)
    # the destination refused the frame, said which, and discarded everything
    end = dst.wait(30)
    assert end is not None and end.reason != "stopped"
    why = f"{err.value} / {end.describe()}"
    assert "PAGES frame" in why and "failed authentication" in why, why
    assert dst.wait_migrated(0) is None


def test_a_reply_altered_on_its_way_back_is_refused_and_counted_by_the_source(
    middle: Any,
) -> None:
    src, guest, _dst, relay = middle(("to_source", Frame.READY))
    registry = CounterRegistry()
    with pytest.raises(MigrationError, match=r"READY frame #\d+ .* failed authentication"):
        migrate_worker(src, relay.address, TOKEN, {"timeout": 10.0}, counters=registry)
    assert registry.snapshot()["\\Hyper-V VM Live Migration(vm)\\Frames Refused"] == 1
    _still_running_here(src, guest)


@pytest.mark.parametrize(
    ("encrypt", "compress"),
    [(True, False), (True, True), (False, False)],
    ids=["encrypted", "compressed-then-encrypted", "authenticated-only"],
)
def test_an_encrypted_migration_carries_no_guest_plaintext_and_the_guest_runs_there(
    middle: Any, encrypt: bool, compress: bool
) -> None:
    src, guest, dst, relay = middle()
    marker = "mark" + secrets.token_hex(12)
    # the shell keeps the line typed in guest memory (and answers that it is no command)
    assert "unknown command" in guest.run(marker)
    options = {"encrypt": encrypt, "compress": compress, "verify": True}
    result = migrate_worker(src, relay.address, TOKEN, options)
    # verify: the destination compared all RAM with the source's checksum at pause
    assert result["phase"] == "done"
    assert dst.wait_migrated(30) is not None
    there = moved(dst)
    first, later = wait_rising(there.ticks)
    assert later > first
    seen = bytes(relay.seen["to_destination"])
    assert len(seen) >= result["bytes_sent"] and result["pages_sent"] > 0
    assert (marker[4:].encode() in seen) is not encrypt


def test_a_frame_altered_on_one_of_several_streams_fails_the_migration(hosts: Any) -> None:
    """Three streams, each sealed under its own keys: a frame altered on the third (a data
    stream, received on a thread of its own; its PASS_END, which every pass sends on every
    stream) is refused there, and the migration fails."""
    src, guest = hosts.boot()
    dst = hosts.destination()
    relay = StreamRelay(
        dst.wait_listening(),
        ("to_destination", Frame.PASS_END),
        connections=3,
        tamper_connection=2,
    )
    try:
        with pytest.raises(MigrationError) as err:
            migrate_worker(src, relay.address, TOKEN, {"timeout": 10.0, "streams": 3})
        assert relay.tampered.is_set()
        _still_running_here(src, guest)
        end = dst.wait(30)
        assert end is not None and end.reason != "stopped"
        why = f"{err.value} / {end.describe()}"
        assert "data stream 2: PASS_END frame" in why and "failed authentication" in why, why
        assert dst.wait_migrated(0) is None
    finally:
        relay.close()
