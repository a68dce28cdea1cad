"""A worker process and its owners, with the reference guest (pyhv.worker.adoption): a worker
started by a direct owner (`pyhv run --process`) stops its VM when that owner goes away; one
given an adoption socket and secret keeps its VM running, refuses a new owner with the wrong
secret, and tells the right one what it is (its config, state, the newest serial output,
counters), then carries on streaming to it."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pyhv.guest_image import image_path
from pyhv.vmms.adoption import AdoptedWorker, AdoptionError, RunDirectory, WorkerRecord, start_time
from pyhv.worker.config import VmConfig
from pyhv.worker.process import WorkerProcess
from tests.support.wait import wait_for

pytestmark = pytest.mark.guest

SECRET = "s" * 43


def _config() -> VmConfig:
    return VmConfig.create(image=str(image_path()), memory="128M", name="adoptee")


def test_a_worker_of_a_direct_owner_stops_its_vm_when_the_owner_goes_away() -> None:
    w = WorkerProcess(_config())
    try:
        w.start()
        w.serial.read_until(b"pyhv> ", 60)
        assert w._sock is not None and w._proc is not None
        w._sock.shutdown(socket.SHUT_RDWR)  # the owner is gone (as if it had died)
        assert w._proc.wait(30) == 0  # the VM stopped and the worker exited on its own
    finally:
        w.close()


def test_an_adoptable_worker_outlives_its_owner_and_tells_the_right_new_owner_what_it_is(
    tmp_path: Path,
) -> None:
    run = RunDirectory(tmp_path)
    w = WorkerProcess(_config())
    w.adoption = (run.listen("adoptee"), SECRET)
    new: AdoptedWorker | None = None
    try:
        w.start()
        w.serial.read_until(b"pyhv> ", 60)
        assert w.pid is not None and w._sock is not None and w._proc is not None
        started = start_time(w.pid)
        assert started is not None
        rec = WorkerRecord("adoptee", w.pid, started, str(run.socket_path("adoptee")), SECRET)
        w._sock.shutdown(socket.SHUT_RDWR)  # the owner is gone

        wrong = AdoptedWorker(WorkerRecord(**{**rec.__dict__, "secret": "x" * 43}))
        with pytest.raises(AdoptionError, match="the adoption secret is wrong"):
            wrong.start()

        got = bytearray()
        new = AdoptedWorker(rec, got.extend)
        new.start()
        a = new.adopted
        assert a.state == "running" and a.end is None and a.config["name"] == "adoptee"
        assert a.serial.endswith(b"pyhv> ")  # the newest output, from the worker's ring
        assert a.counters["owners"] == 2 and a.counters["adoptions_refused"] == 1
        assert w._proc.poll() is None  # the same process, still running its VM
        new.send(b"ticks\r")
        wait_for(lambda: b"ticks: " in got, 30, "the guest answering its new owner")
        new.stop("done")
        end = new.wait(30)
        assert end is not None and end.reason == "stopped" and end.detail == "done"
        assert w._proc.wait(30) == 0
    finally:
        if new is not None:
            new.close()
        w.close()
