"""Hyper-V Manager's Memory Status (pyhv.dynmem.status.memory_health) on its edges: OK while
what the VM has plus what the host can still give it covers demand plus the buffer, Low when
only the buffer is short, Warning when demand itself is."""

from __future__ import annotations

import pytest

from pyhv.dynmem.balancer import MemorySettings
from pyhv.dynmem.status import HEALTH_GAUGE, MemoryStatus, memory_health

pytestmark = pytest.mark.unit

MIB = 256  # pages


def test_enough_assigned_is_ok_whatever_the_host_has() -> None:
    # 1000 MiB committed, 20 % buffer: 1200 MiB wanted, 1200 MiB assigned.
    assert memory_health(1000 * MIB, 1200 * MIB, 20, 4096 * MIB, 0) == "OK"


def test_a_shortfall_the_host_can_fill_is_ok() -> None:
    assert memory_health(1000 * MIB, 1000 * MIB, 20, 4096 * MIB, 200 * MIB) == "OK"


def test_one_page_short_of_the_buffer_is_low() -> None:
    assert memory_health(1000 * MIB, 1000 * MIB, 20, 4096 * MIB, 200 * MIB - 1) == "Low"


def test_at_its_maximum_the_buffer_short_is_low_even_with_a_free_host() -> None:
    assert memory_health(1000 * MIB, 1024 * MIB, 20, 1024 * MIB, 8192 * MIB) == "Low"


def test_demand_equal_to_what_it_can_reach_is_low_not_warning() -> None:
    assert memory_health(1024 * MIB, 1024 * MIB, 20, 1024 * MIB, 0) == "Low"


def test_demand_above_its_maximum_is_warning() -> None:
    assert memory_health(1024 * MIB + 1, 1024 * MIB, 20, 1024 * MIB, 8192 * MIB) == "Warning"


def test_demand_above_what_the_host_has_left_is_warning() -> None:
    assert memory_health(1500 * MIB, 1000 * MIB, 5, 4096 * MIB, 499 * MIB) == "Warning"


def test_a_maximum_below_assigned_gives_no_negative_room() -> None:
    # Assigned above the maximum (it was just lowered): the host "room" is none, not negative.
    assert memory_health(900 * MIB, 1000 * MIB, 5, 512 * MIB, 8192 * MIB) == "OK"
    assert memory_health(1001 * MIB, 1000 * MIB, 5, 512 * MIB, 8192 * MIB) == "Warning"


def test_the_gauge_values_are_ordered_by_severity() -> None:
    assert HEALTH_GAUGE == {"OK": 0, "Low": 1, "Warning": 2}


def test_a_status_has_no_health_before_the_guest_reported_and_uses_the_settings_after() -> None:
    settings = MemorySettings(256 * MIB, 128 * MIB, 512 * MIB, buffer_percent=20)
    quiet = MemoryStatus(visible_pages=256 * MIB, assigned_pages=256 * MIB, ballooned_pages=0)
    assert quiet.health(settings, 0) is None
    busy = MemoryStatus(
        visible_pages=512 * MIB,
        assigned_pages=512 * MIB,
        ballooned_pages=0,
        committed_pages=600 * MIB,
        available_pages=0,
        guest_committed_pages=600 * MIB,
    )
    assert busy.health(settings, 8192 * MIB) == "Warning"
    assert busy.health(MemorySettings(256 * MIB, 128 * MIB, 1024 * MIB), 8192 * MIB) == "OK"
