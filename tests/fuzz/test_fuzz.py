"""The fuzz campaign's bounded run: every decoder a guest or a peer reaches takes its seeds and a
fixed number of fuzzed inputs (Hypothesis, derandomized: the same inputs on every run) without
a crash, a hang or unbounded memory; and the whole HTTP request, as raw bytes, on a live VMMS
socket. Longer campaigns: `bench/fuzz.py` (docs/security.md, "Fuzzing")."""

from __future__ import annotations

import os
import resource
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings

from tests.support.fuzz import Crash, Target, all_targets, inputs, mutate, run_one
from tests.support.fuzz import vmms_http as http
from tests.vmms.vmms_process import VmmsProcess, vmms_host

#: Fuzzed inputs per decoder in the suite (bench/fuzz.py runs for as long as it is told).
EXAMPLES = 400
HTTP_EXAMPLES = 200

TARGETS = all_targets()


def _params() -> list[object]:
    return [
        pytest.param(
            t,
            id=t.name,
            marks=pytest.mark.simulation if t.kind == "simulation" else pytest.mark.unit,
        )
        for t in TARGETS
    ]


def _settings(n: int) -> settings:
    return settings(
        max_examples=n,
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture
def traced() -> Iterator[None]:
    """tracemalloc on: run_one counts each input's allocations exactly (else it watches the
    process's peak resident memory, which costs nothing)."""
    tracemalloc.start()
    try:
        yield
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("target", _params())
def test_every_decoder_takes_its_valid_seeds(target: Target) -> None:
    for seed in target.corpus:
        run_one(target, seed)


@pytest.mark.parametrize("target", _params())
def test_no_fuzzed_input_crashes_hangs_or_exhausts_memory_in_a_decoder(target: Target) -> None:
    @_settings(EXAMPLES)
    @given(inputs(target))
    def fuzz(data: bytes) -> None:
        run_one(target, data)

    fuzz()


@pytest.mark.unit
def test_the_campaign_covers_every_decoder_a_guest_or_a_peer_reaches() -> None:
    names = {t.name.split(".")[0] for t in TARGETS}
    assert names == {"vmbus", "dynmem", "migration", "vmms", "worker", "devices", "loaders"}
    assert len({t.name for t in TARGETS}) == len(TARGETS)


# --- the harness finds what it looks for ---------------------------------------------------


def _planted(data: bytes) -> None:
    """A decoder of a length byte and that many bytes, with three bugs (what the campaign must
    report): it trusts the length, hangs on b"HANG", takes memory on b"MEM" (64 MiB, or the
    MiB that follow)."""
    if data.startswith(b"HANG"):
        while True:
            time.sleep(0.01)
    if data.startswith(b"MEM"):
        mib = int(data[3:] or b"64")
        assert len(bytearray(b"\x01") * (mib << 20))  # touched: resident, at the peak
        return
    if not data:
        raise ValueError("empty: the documented error")
    body = data[1:]
    body[data[0] - 1]  # IndexError when the length says more than there is


PLANTED = Target("planted", "a decoder with planted bugs", lambda: [b"\x04abcd"], _planted,
                 (ValueError,))  # fmt: skip


@pytest.mark.unit
def test_the_harness_reports_an_undeclared_exception_a_hang_and_a_memory_blowup(
    traced: None,
) -> None:
    run_one(PLANTED, b"")  # the documented error is no crash
    run_one(PLANTED, b"\x04abcd")
    with pytest.raises(Crash, match="exception: IndexError"):
        run_one(PLANTED, b"\x05abcd")
    with pytest.raises(Crash, match="hang"):
        run_one(PLANTED, b"HANG", time_limit=0.3)
    with pytest.raises(Crash, match="memory: allocated 64 MiB"):
        run_one(PLANTED, b"MEM")


@pytest.mark.unit
def test_without_tracemalloc_a_memory_blowup_shows_in_the_peak_resident_memory() -> None:
    assert not tracemalloc.is_tracing()
    run_one(PLANTED, b"\x04abcd")
    # the peak only grows: take 96 MiB more than the process ever held (an earlier test may
    # have taken some; the check's limit is 32 MiB)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    now = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
    with pytest.raises(Crash, match=r"memory: the peak resident memory grew \d+ MiB"):
        run_one(PLANTED, b"MEM%d" % (peak - now + 96))


@pytest.mark.unit
def test_mutating_a_valid_seed_finds_a_decoder_that_trusts_a_length() -> None:
    assert mutate(b"\x04abcd", [(9, 3, 0)]) == b"\x04ab"  # truncated

    @_settings(100)
    @given(inputs(PLANTED))
    def fuzz(data: bytes) -> None:
        if not data.startswith((b"HANG", b"MEM")):
            run_one(PLANTED, data)

    with pytest.raises(Crash, match="IndexError"):
        fuzz()


# --- the whole HTTP request on a live VMMS ---------------------------------------------------


@pytest.fixture(scope="module")
def vmms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmsProcess]:
    with vmms_host(tmp_path_factory.mktemp("fuzz-vmms"), budget="1G") as host:
        yield host


@pytest.mark.unit
def test_raw_http_requests_never_crash_the_vmms_and_it_still_answers(vmms: VmmsProcess) -> None:
    sock = Path(vmms.state) / "vmms.sock"
    target = http.target(sock, lambda: vmms.proc.poll() is None)
    for seed in target.corpus:
        run_one(target, seed, time_limit=http.ANSWER_TIME + 5, memory_limit=None)

    @_settings(HTTP_EXAMPLES)
    @given(inputs(target))
    def fuzz(data: bytes) -> None:
        run_one(target, data, time_limit=http.ANSWER_TIME + 5, memory_limit=None)

    fuzz()
    http.still_answers(sock)
    assert vmms.proc.poll() is None
