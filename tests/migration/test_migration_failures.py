"""A migration that fails at any phase aborts cleanly: the source VM runs on, unchanged (its
workload keeps writing, its timer ticks); the destination discards what it received (its worker
ends and exits); the error says what happened and in which phase: the source's phase when it
learned of the failure (a failure at the destination reaches it at its next send or read).
A page changed at the destination after it arrived is caught by the RAM checksum at pause."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pyhv.migration import MigrationError
from pyhv.migration.worker import IncomingWorker, migrate_worker
from tests.migration.conftest import TOKEN, Guest, wait_rising
from tests.support.sched import realtime_threads

pytestmark = pytest.mark.guest

LOST = r"connection|closed|lost|reset|Broken pipe|did not answer"
#: A failure the destination finds reaches the source at its next send: unpaced, the source may
#: have put the rest of a short pass into the sockets' buffers and moved on to the next phase by
#: then. At 2 MB/s it is still sending the pass in which the destination gave up.
PACED = {"bandwidth": 2_000_000}


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
    # the source VM runs on, unchanged (and none of its threads kept the pause's priority)
    assert src.end is None
    assert src.pid is not None and realtime_threads(src.pid) == []
    first, later = wait_rising(guest.touched)
    assert later > first, "the source's workload stopped"
    assert guest.ticks() > ticks
    # the destination holds nothing: its worker gave up and ended
    end = dst.wait(30)
    assert end is not None and end.reason != "stopped", end
    assert dst.wait_migrated(0) is None
    return err.value


@pytest.mark.parametrize(
    ("phase", "action", "pattern", "learned"),
    [
        # cut after connecting: authentication is the first exchange that fails
        ("connect", "cut", LOST, "authenticate"),
        ("config", "cut", LOST, "config"),
        ("pass1", "cut", LOST, "pass1"),
        ("pass1", "corrupt", "failed authentication", "pass1"),
        ("pass2", "corrupt", "failed authentication", "pass2"),  # paced: see below
        ("prepare", "cut", LOST, "prepare"),  # the passes done, the VM not paused yet
        # paused: the cut is learned at the first frame sent after it, the state (which goes
        # ahead of the last pages); the final PASS_END was not sent, so the VM stays here
        ("final", "cut", LOST, "commit"),
        # the STATE frame and the last pages commit (two_phase_commit off): learned while
        # committing
        ("state", "corrupt", "failed authentication", "commit"),
        ("commit", "cut", LOST, "commit"),
    ],
)
def test_a_source_side_fault_at_each_phase_leaves_the_vm_running_at_the_source(
    source: Any, destination: Any, phase: str, action: str, pattern: str, learned: str
) -> None:
    paced = PACED if action == "corrupt" and phase != "state" else {}
    err = _fails(source, destination(), pattern, faults={phase: action}, **paced)
    assert err.phase == learned
    assert f"failed during {learned}: " in str(err)


@pytest.mark.parametrize(
    ("phase", "action", "pattern", "learned"),
    [
        ("authenticate", "exit", LOST, "authenticate"),
        ("config", "exit", LOST, "config"),  # the source waits for READY
        ("memory", "exit", LOST, "pass1"),  # the first page frame of pass 1
        ("memory", "cut", LOST, "pass1"),
        ("prepare", "exit", LOST, "prepare"),  # the source waits for PREPARED, not paused
        # the source sent STATE (which commits) and waits for RESUMED
        ("state", "fail", "injected failure at state", "commit"),
        ("restored", "exit", LOST, "commit"),
        ("restored", "cut", LOST, "commit"),
    ],
)
def test_a_destination_killed_or_cut_off_at_each_phase_leaves_the_vm_running_at_the_source(
    source: Any, destination: Any, phase: str, action: str, pattern: str, learned: str
) -> None:
    dst = destination(faults={phase: action})
    err = _fails(source, dst, pattern, **(PACED if phase == "memory" else {}))
    assert err.phase == learned
    assert f"failed during {learned}: " in str(err)
    if action == "exit":
        dst.close()
        assert dst.returncode == 17


@pytest.mark.parametrize("after", [0, 1])  # post-copy at once, hybrid after one pass
@pytest.mark.parametrize(
    ("side", "action"), [("source", "cut"), ("destination", "exit"), ("destination", "cut")]
)
def test_a_post_copy_that_fails_at_prepare_leaves_the_vm_running_at_the_source(
    source: Any, destination: Any, after: int, side: str, action: str
) -> None:
    # PREPARE comes before the post-copy's pause (the destination registers its RAM and
    # listens for the urgent channel there): a failure then is pre-copy's, the VM runs on here
    faults = {"prepare": action}
    dst = destination(faults=faults) if side == "destination" else destination()
    opt: dict[str, Any] = {"postcopy": True, "postcopy_after": after, "downtime_target": 1e-3}
    if side == "source":
        opt["faults"] = faults
    err = _fails(source, dst, LOST, **opt)
    assert err.phase == "prepare", err
    assert "failed during prepare: " in str(err)


def test_with_two_phase_commit_a_destination_gone_before_restored_is_learned_in_state(
    source: Any, destination: Any
) -> None:
    dst = destination(faults={"restored": "exit"})
    err = _fails(source, dst, LOST, two_phase_commit=True)
    assert err.phase == "state"  # the source was waiting for RESTORED, COMMIT not sent


def test_a_page_changed_at_the_destination_after_it_arrived_fails_the_ram_checksum(
    source: Any, destination: Any
) -> None:
    # Every frame arrived intact (each passed its own checksum); then one bit of guest RAM is
    # flipped at the destination before it compares all RAM with the source's checksum.
    dst = destination(faults={"state": "tamper"})
    err = _fails(
        source,
        dst,
        r"the destination aborted: guest RAM differs from the source's at pause "
        r"\(checksum [0-9a-f]+ here, [0-9a-f]+ there\)",
    )
    assert err.phase == "commit"  # the source sent STATE (which commits), waits for RESUMED
    assert "the VM keeps running here" in str(err)
    assert "ticks: " in source[1].run("ticks")  # its console answers at the source


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
