from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.guests.build import build_test_guest


@pytest.fixture(scope="session")
def test_guest(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    out = tmp_path_factory.mktemp("guests")
    return lambda name: build_test_guest(name, out)
