"""A VM's memory status crosses from its worker to the VMMS field by field: what is sent is what
is read back, and a status with any field wrong is refused with an error that names it."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from pyhv.dynmem.balancer import MemorySettings
from pyhv.dynmem.status import (
    MemoryStatus,
    StatusError,
    VpCounters,
    VspCounters,
    pressure_percent,
    target_pages,
)

pytestmark = pytest.mark.unit

MIB = 256  # pages

STATUS = MemoryStatus(
    visible_pages=1024 * MIB,
    assigned_pages=768 * MIB,
    ballooned_pages=256 * MIB,
    committed_pages=500 * MIB,
    available_pages=200 * MIB,
    guest_committed_pages=756 * MIB,
    busy=True,
    reported_at=1_700_000_000.5,
    vsp=VspCounters(status_reports=12, messages_accepted=20, ballooned_pages=256 * MIB),
    vps=(VpCounters(0, io_port=900, halt=3, handler_seconds=0.25), VpCounters(1, msr=2)),
)


def test_a_status_read_back_from_its_wire_form_is_the_status_sent() -> None:
    assert MemoryStatus.from_wire(STATUS.to_wire()) == STATUS
    quiet = MemoryStatus(512 * MIB, 512 * MIB, 0)  # its guest has not reported yet
    assert MemoryStatus.from_wire(quiet.to_wire()) == quiet and not quiet.reported


def _with(**changes: Any) -> dict[str, Any]:
    wire = STATUS.to_wire()
    wire["vps"] = [dict(vp) for vp in wire["vps"]]
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            target = wire[outer][0] if outer == "vps" else wire[outer]
            target[inner] = value
        else:
            wire[key] = value
    return wire


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"assigned_pages": -1}, "Expected `int` >= 0 - at `$.assigned_pages`"),
        ({"visible_pages": "many"}, "Expected `int`, got `str` - at `$.visible_pages`"),
        ({"ballooned_pages": True}, "Expected `int`, got `bool` - at `$.ballooned_pages`"),
        ({"committed_pages": 1 << 41}, "Expected `int` <= 1099511627776 - at `$.committed_pages`"),
        ({"visible_pages": 1024 * MIB + 1}, "must equal visible_pages"),
        ({"committed_pages": None}, "all numbers (the guest reported) or all null"),
        ({"busy": 1}, "Expected `bool`, got `int` - at `$.busy`"),
        ({"reported_at": float("nan")}, "Expected `float` >= 0.0 - at `$.reported_at`"),
        ({"reported_at": float("inf")}, "Expected `float` <= 1000000000000.0"),
        ({"version": 2}, "version 2 is not 1"),
        ({"extra": 1}, "Object contains unknown field `extra`"),
        ({"vps": "all"}, "Expected `array`, got `str` - at `$.vps`"),
        ({"vsp.doorbells": -5}, "Expected `int` >= 0 - at `$.vsp.doorbells`"),
        ({"vps.halt": 2.5}, "Expected `int`, got `float` - at `$.vps[0].halt`"),
        ({"vps.vp": 5000}, "Expected `int` <= 1023 - at `$.vps[0].vp`"),
    ],
)
def test_a_status_with_a_wrong_field_is_refused_with_its_name(
    changes: dict[str, Any], words: str
) -> None:
    with pytest.raises(StatusError, match=re.escape(words)):
        MemoryStatus.from_wire(_with(**changes))


@pytest.mark.parametrize("raw", [None, [], "status", 5])
def test_a_status_that_is_not_an_object_is_refused(raw: object) -> None:
    with pytest.raises(StatusError, match="memory status: Expected `object`, got"):
        MemoryStatus.from_wire(raw)


def test_pressure_and_target_are_the_same_for_one_vm_and_for_the_balancers_columns() -> None:
    settings = MemorySettings.from_mib(startup=512, minimum=256, maximum=4096, buffer_percent=20)
    assert STATUS.pressure == pytest.approx(500 / 768 * 100)
    assert STATUS.target_pages(settings) == 600 * MIB
    column = np.array([500 * MIB, 10 * MIB], dtype=np.int64)
    targets = target_pages(column, 20, settings.minimum_pages, settings.maximum_pages)
    assert targets.tolist() == [600 * MIB, 256 * MIB]  # the second at its minimum
    assert pressure_percent(column, 768 * MIB)[0] == STATUS.pressure
