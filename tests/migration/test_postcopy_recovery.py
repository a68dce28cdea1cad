"""Recovery of a cut post-copy link (QEMU's postcopy-recover): the link dies while the guest
already runs at the destination with part of its memory still at the source. The destination
keeps the VM (VPs touching a missing page wait), the source keeps its paused copy and comes
back over a new authenticated connection naming the migration; the destination says what it
still lacks and the post-copy ends with the RAM both sides add up equal. Strangers trying to
resume are refused and counted; a source that never comes back stops the VM at the
destination, saying so."""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from pyhv.migration import frames
from pyhv.migration.stream import (
    Frame,
    FrameSocket,
    MigrationError,
    PeerAborted,
    authenticate_source,
    token_bytes,
)
from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved, wait_rising
from tests.support.cut_relay import CutRelay
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest


def _start(hosts: Any, source_recover: float, dest_recover: float) -> tuple[Any, ...]:
    """A guest rewriting 16 MiB moving by post-copy over a slow link through a relay; returns
    once it runs at the destination and some of the push went over the link."""
    src, guest = hosts.boot("128M")
    guest.run("dirty 16")
    guest.wait_working_set(16)
    dst = hosts.destination(recover_timeout=dest_recover)
    relay = CutRelay(dst.wait_listening())
    progress: list[dict[str, Any]] = []
    box: dict[str, Any] = {}
    options = {"postcopy": True, "bandwidth": 2 << 20, "recover_timeout": source_recover}

    def run() -> None:
        try:
            box["result"] = migrate_worker(
                src, relay.address, TOKEN, options, on_progress=progress.append
            )
        except (MigrationError, OSError) as e:
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert dst.wait_migrated(60) is not None  # the VM runs at the destination
    at = relay.to_destination
    wait_for(lambda: relay.to_destination > at + (1 << 20), 30, "1 MiB of post-copy sent")
    return src, dst, relay, progress, box, t


def _resume(
    address: tuple[str, int],
    token: str,
    migration: str,
    frame: Frame = Frame.RESUME,
    encrypt: bool = False,
) -> None:
    """A stranger's resume (or urgent channel, PREEMPT): handshake with `token`, the frame
    naming `migration`, read the answer."""
    fs = FrameSocket(socket.create_connection(address, timeout=10), timeout=10)
    try:
        authenticate_source(fs, token_bytes(token), encrypt)
        fs.send_json(frame, frames.Resume(migration))
        fs.recv()
    finally:
        fs.close()


def _migration_id(progress: list[dict[str, Any]]) -> str:
    return next(p["postcopy"]["migration"] for p in progress if p.get("postcopy"))


def test_a_link_cut_mid_post_copy_recovers_and_strangers_cannot_resume_it(hosts: Any) -> None:
    src, dst, relay, progress, box, t = _start(hosts, source_recover=60, dest_recover=60)
    address = dst.address
    relay.hold()  # the link stays down while strangers try
    relay.cut()
    mid = _migration_id(progress)
    with pytest.raises(MigrationError, match="authentication failed"):
        _resume(address, "not-the-migration-token", mid)
    with pytest.raises(PeerAborted, match="names migration 0+, not the one"):
        _resume(address, TOKEN, "0" * 32)
    # the right token and id, but not the migration's mode (a downgrade or upgrade)
    with pytest.raises(PeerAborted, match="the migration is not encrypted"):
        _resume(address, TOKEN, mid, encrypt=True)
    relay.release()  # the link is back: the source reconnects through it
    wait_for(
        lambda: any(p.get("postcopy", {}).get("recoveries") for p in progress),
        60,
        "the source resuming the post-copy",
    )
    # one holding the token and the migration's id, while the source is connected
    with pytest.raises(PeerAborted, match="a second source is refused"):
        _resume(address, TOKEN, mid)
    with pytest.raises(PeerAborted, match="an urgent channel is attached already"):
        _resume(address, TOKEN, mid, Frame.PREEMPT)
    t.join(120)
    assert "error" not in box, box.get("error")
    result = box["result"]
    pc = result["postcopy"]
    # each link had its urgent channel (post-copy preempt): two links, two channels
    assert pc["recoveries"] == 1 and pc["urgent_channels"] == 2
    assert pc["resumes_refused"] == 5
    # RAM at the pause, as the destination added it up over both links
    assert pc["checksum_destination"] == pc["checksum_source"]
    assert pc["urgent_pages"] + pc["pushed_pages"] >= pc["needed_pages"]
    # the VPs still faulted and waited, and their blocktime is reported per thread
    assert pc["faults"] > 0 and pc["thread_blocktime_ms"]
    assert 0 < pc["blocktime_p50_ms"] <= pc["blocktime_p99_ms"] <= pc["blocktime_max_ms"]
    end = src.wait(30)
    assert end is not None and "migrated to" in end.detail
    there = moved(dst)
    first, later = wait_rising(there.touched)
    assert later > first, "the dirty workload stopped at the destination"
    assert "visible: 128 MiB" in there.run("mem")
    relay.close()


def test_a_source_that_never_comes_back_stops_the_vm_at_the_destination(hosts: Any) -> None:
    _src, dst, relay, _progress, _box, _t = _start(hosts, source_recover=5, dest_recover=3)
    relay.hold()  # and never released: the source cannot come back
    relay.cut()
    end = dst.wait(60)
    assert end is not None and "post-copy failed" in end.detail
    assert "the source did not come back within 3 s" in end.detail
    assert "the source held the rest of its memory" in end.detail
    relay.close()


def test_a_vm_stopped_at_the_destination_while_the_link_is_down_ends_its_worker(
    hosts: Any,
) -> None:
    """Its VPs (and KVM's async page-fault worker) wait on missing pages: stopping the VM lets
    them go before the VM is torn down, so the worker process ends (it once hung for good,
    unkillable, in KVM's teardown)."""
    _src, dst, relay, _progress, _box, _t = _start(hosts, source_recover=60, dest_recover=60)
    relay.hold()
    relay.cut()
    dst.stop()
    closing = threading.Thread(target=dst.close, daemon=True)
    closing.start()
    closing.join(60)
    assert not closing.is_alive(), "the destination worker did not end"
    end = dst.wait(0)
    assert end is not None and "post-copy failed" in end.detail or "stopped" in end.describe()
    relay.close()
