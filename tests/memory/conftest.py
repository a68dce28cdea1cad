"""The memory manager tests' hosts (tests/support/memory_host.py), closed after each test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.memory_host import Host


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    made: list[Host] = []
    yield made
    for h in made:
        h.close()
