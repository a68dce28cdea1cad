"""A migration that fails at any phase aborts cleanly: the source VM runs on, unchanged (its
workload keeps writing, its timer ticks); the destination discards what it received (its worker
ends and exits); the error says what happened and in which phase."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyhv.migration import MigrationError
from pyhv.migration.worker import IncomingWorker, migrate_worker
from tests.migration.conftest import TOKEN, Guest, wait_rising

pytestmark = pytest.mark.guest

LOST = r"connection|closed|lost|reset|Broken pipe|did not answer"


@pytest.fixture(scope="module")
def source() -> Iterator[tuple[Any, Guest]]:
    """One source VM for every failure: each must leave it running for the next."""
    from pyhv.guest_image import image_path
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    w = WorkerProcess(VmConfig.create(image=image_path(), memory="128M"))
    w.start()
    guest = Guest(w)
    guest.run("dirty 4")
    yield w, guest
    w.close()


@pytest.fixture
def destination() -> Iterator[Any]:
    made: list[IncomingWorker] = []

    def make(**kw: Any) -> IncomingWorker:
        kw.setdefault("accept_timeout", 30.0)
        d = IncomingWorker(kw.pop("token", TOKEN), timeout=10.0, **kw)
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        d.close()


def _fails(
    source: tuple[Any, Guest], dst: IncomingWorker, pattern: str, **opt: Any
) -> MigrationError:
    src, guest = source
    assert src.end is None, "an earlier test lost the source VM"
    ticks = guest.ticks()
    opt.setdefault("min_passes", 2)  # so that there is a second pass to break
    opt.setdefault("timeout", 10.0)
    with pytest.raises(MigrationError, match=pattern) as err:
        migrate_worker(src, dst.wait_listening(), opt.pop("token", TOKEN), opt)
    # the source VM runs on, unchanged
    assert src.end is None
    first, later = wait_rising(guest.touched)
    assert later > first, "the source's workload stopped"
    assert guest.ticks() > ticks
    # the destination holds nothing: its worker gave up and ended
    end = dst.wait(30)
    assert end is not None and end.reason != "stopped", end
    assert dst.wait_migrated(0) is None
    return err.value


@pytest.mark.parametrize(
    ("phase", "action", "pattern"),
    [
        ("connect", "cut", LOST),
        ("config", "cut", LOST),
        ("pass1", "cut", LOST),
        ("pass1", "corrupt", "checksum"),
        ("pass2", "corrupt", "checksum"),
        ("final", "cut", LOST),
        ("state", "corrupt", "checksum"),
        ("commit", "cut", LOST),
    ],
)
def test_a_source_side_fault_at_each_phase_leaves_the_vm_running_at_the_source(
    source: Any, destination: Any, phase: str, action: str, pattern: str
) -> None:
    err = _fails(source, destination(), pattern, faults={phase: action})
    assert err.phase


@pytest.mark.parametrize(
    ("phase", "action", "pattern"),
    [
        ("authenticate", "exit", LOST),
        ("config", "exit", LOST),
        ("memory", "exit", LOST),
        ("memory", "cut", LOST),
        ("state", "fail", "injected failure at state"),
        ("restored", "exit", LOST),
        ("restored", "cut", LOST),
    ],
)
def test_a_destination_killed_or_cut_off_at_each_phase_leaves_the_vm_running_at_the_source(
    source: Any, destination: Any, phase: str, action: str, pattern: str
) -> None:
    dst = destination(faults={phase: action})
    err = _fails(source, dst, pattern)
    assert err.phase
    if action == "exit":
        dst.close()
        assert dst.returncode == 17


def test_a_source_without_the_token_is_refused_before_any_memory_moves(
    source: Any, destination: Any
) -> None:
    err = _fails(source, destination(), "authentication failed", token="not-the-right-token")
    assert err.phase == "authenticate"


def test_a_destination_without_enough_memory_refuses_the_vm(source: Any, destination: Any) -> None:
    err = _fails(source, destination(max_memory=64 << 20), "out of memory: the VM needs 128 MiB")
    assert err.phase == "config"


def test_a_destination_that_does_not_listen_is_reported(source: Any, destination: Any) -> None:
    src, _guest = source
    with pytest.raises(MigrationError, match="cannot connect to the destination"):
        migrate_worker(src, ("127.0.0.1", 1), TOKEN, {"timeout": 5.0})
    assert src.end is None
