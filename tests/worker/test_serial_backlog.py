"""The worker's serial batcher is bounded (issue 11, finding 8): while its owner does not take
output, a guest printing 8 MiB leaves at most SERIAL_BACKLOG bytes waiting, the oldest
dropped and counted; the newest output still arrives once the owner reads again."""

from __future__ import annotations

import threading

import pytest

from pyhv.worker.server import SERIAL_BACKLOG, _SerialBatcher

pytestmark = pytest.mark.unit


def test_an_owner_that_does_not_read_leaves_a_bounded_backlog() -> None:
    gate = threading.Event()
    sent: list[bytes] = []

    def send(data: bytes) -> None:
        gate.wait(10)  # the owner does not read until the gate opens
        sent.append(data)

    batcher = _SerialBatcher(send)
    written = b"".join(i.to_bytes(4, "little") for i in range(2 << 20))  # 8 MiB, all distinct
    for off in range(0, len(written), 4096):
        batcher.add(written[off : off + 4096])
        assert len(batcher._buf) <= SERIAL_BACKLOG
    assert batcher.dropped >= len(written) - SERIAL_BACKLOG - (256 << 10)
    gate.set()
    batcher.close()
    received = b"".join(sent)
    assert len(received) + batcher.dropped == len(written)
    assert written.endswith(received[-SERIAL_BACKLOG:])  # the newest output arrived, in order
