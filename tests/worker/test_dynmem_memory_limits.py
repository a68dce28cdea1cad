"""A running VM's Dynamic Memory range changes as the book allows (minimum down, maximum up):
the worker refuses the other directions with the reason, clamps later targets to the new range,
hot-adds up to a raised maximum and tells the guest the new maximum (the info message)."""

from __future__ import annotations

import re

import pytest

from pyhv.guest_image import image_path
from pyhv.worker import VmConfig, WorkerProcess
from pyhv.worker.dynmem import DynamicMemoryError
from pyhv.worker.script import ENTER, PROMPT
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

MiB = 1 << 20
PAGES_PER_MIB = 256


@pytest.fixture(scope="module")
def guest_image() -> str:
    return str(image_path())


def test_a_raised_maximum_lets_the_worker_hot_add_beyond_the_maximum_it_booted_with(
    guest_image: str,
) -> None:
    cfg = VmConfig.create(
        image=guest_image, dynamic_memory=True, startup="256M", minimum="128M", maximum="320M"
    )
    with WorkerProcess(cfg) as vm:
        vm.start()
        vm.serial.read_until(PROMPT, 60)
        assert wait_for(
            lambda: vm.memory_status()["negotiated"], 30, 'vm.memory_status()["negotiated"]'
        )
        # Booted with 320M as its maximum, the worker clamps a bigger target to it.
        assert vm.set_memory_target(384 * MiB)["goal_pages"] == 320 * PAGES_PER_MIB
        vm.set_memory_target(256 * MiB)
        for lo, hi, words in [
            (192 * MiB, 320 * MiB, "minimum can only go down while VM"),
            (128 * MiB, 288 * MiB, "maximum can only go up while VM"),
            (128 * MiB, 384 * MiB + 4096, "whole number of MiB"),
            (8 * MiB, 384 * MiB, "minimum memory 8M must be from 16M"),
        ]:
            with pytest.raises(DynamicMemoryError, match=words):
                vm.set_memory_limits(lo, hi)
        with pytest.raises(DynamicMemoryError, match=r"needs \[minimum, maximum\]"):
            vm._memory("limits", 384 * MiB)
        assert vm.memory_status()["maximum_pages"] == 320 * PAGES_PER_MIB
        result = vm.set_memory_limits(64 * MiB, 384 * MiB)
        assert result["maximum_pages"] == 384 * PAGES_PER_MIB and result["guest_informed"]
        st = vm.memory_status()
        assert st["minimum_pages"] == 64 * PAGES_PER_MIB
        assert st["maximum_pages"] == 384 * PAGES_PER_MIB
        plan = vm.set_memory_target(384 * MiB)
        assert plan["goal_pages"] == 384 * PAGES_PER_MIB and not plan["clamped"]
        assert wait_for(
            lambda: vm.memory_status()["visible_pages"] == 384 * PAGES_PER_MIB,
            60,
            'vm.memory_status()["visible_pages"] == 384 * PAGES_PER_MIB',
        )
        st = vm.memory_status()
        assert st["assigned_pages"] == 384 * PAGES_PER_MIB and st["last_error"] is None
        assert st["hot_added_pages"] == 128 * PAGES_PER_MIB
        # The guest heard the new maximum, in pages.
        vm.send(b"dm" + ENTER)
        out = vm.serial.read_until(PROMPT, 60).decode()
        assert re.search(r"^max-page-count: (\d+)", out, re.M)[1] == str(  # type: ignore[index]
            384 * PAGES_PER_MIB
        ), out
