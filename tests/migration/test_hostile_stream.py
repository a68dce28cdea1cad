"""What the destination does with a hostile source (the stream is untrusted network input):
values that would allocate, or slip past a check, are refused with a MigrationError."""

from __future__ import annotations

import socket
import tracemalloc

import pytest
import zstandard

from pyhv.migration.destination import Incoming
from pyhv.migration.stream import MigrationError

TOKEN = "shared-secret-1"


def _incoming() -> Incoming:
    lst = socket.socket()
    inc = Incoming(lst, TOKEN, max_memory=1 << 30)
    lst.close()
    return inc


def test_a_compressed_frame_declaring_more_than_its_pages_is_refused_before_allocating() -> None:
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))  # 2 KiB declaring 64 MiB
    assert len(bomb) < 8192
    target = memoryview(bytearray(4096))
    tracemalloc.start()
    try:
        with pytest.raises(MigrationError, match="declares 67108864 bytes, not 4096"):
            _incoming()._decompress(bytearray(bomb), target)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_compressed_frame_with_a_garbled_header_is_refused() -> None:
    with pytest.raises(MigrationError, match="compressed page frame"):
        _incoming()._decompress(bytearray(b"not zstd at all"), memoryview(bytearray(4096)))


def test_a_compressed_frame_of_the_right_size_still_fills_its_pages() -> None:
    data = bytes(range(256)) * 32
    target = memoryview(bytearray(8192))
    _incoming()._decompress(bytearray(zstandard.ZstdCompressor().compress(data)), target)
    assert bytes(target) == data
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(data)
    target = memoryview(bytearray(8192))
    _incoming()._decompress(bytearray(unsized), target)
    assert bytes(target) == data
