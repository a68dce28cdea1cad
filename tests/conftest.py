"""Shared test setup: every test has one kind, the kinds are proven at run time, and the session
counts the tests that needed KVM against those that ran (read by .ci/run).

Kinds (markers registered in pyproject.toml):
- `guest`: runs real guest code under /dev/kvm (a VP executes guest instructions);
- `kvm`: uses /dev/kvm but runs no guest code;
- `unit`: pure code, no KVM and no guest (it may start local processes and sockets);
- `simulation`: a Python stand-in for the guest, a fake worker, or a simulated fleet.
A test's kind is the closest kind marker: its own (decorator, or a parameter's marks), else its
class's, else its module's `pytestmark`. Collection fails, naming the test, when it has none or
two on one node. A `simulation` test that opens /dev/kvm (a real partition driven by a Python
stand-in) asks for the `needs_kvm` fixture and counts as needing KVM like `guest` and `kvm`.

Runtime proof, so a marker cannot claim more than the test does. The session sets
PYHV_GUEST_RAN_DIR to a fresh directory that every process it starts inherits. Each VP thread
that starts its run loop writes a record there (pyhv.hypervisor.guest_ran); a test that runs a
guest in QEMU writes one through tests.kinds.qemu_guest_ran once KVM's debugfs lists a VM of
that QEMU process (QEMU runs `-accel kvm`, never its emulator) and the guest printed on its
serial port. A test ran guest code when a record appeared between the start of its setup and
the end of its call, or while a fixture it uses was set up (a guest run once for a module
whose tests then read its results). Then:
- a `guest` test that passed without guest code fails "marked guest but ran no guest code";
- a `kvm`, `unit` or `simulation` test that ran guest code fails "ran guest code: mark it guest".
KVM's own exit counters in debugfs would be a stronger proof, but this kernel refuses to read
them (EPERM), hence the records. A VP thread that starts counts as guest code run: its first
KVM_RUN enters the guest.

With /dev/kvm present, a test that needs KVM and skips fails. Without it such tests skip and the
summary says loudly how many could not run. The session's last line is
"KVM: present, ran N of M tests that need KVM" (M: collected tests that need KVM, N: those whose
call ran without skipping), also written to $PYHV_KVM_REPORT. With $PYHV_KINDS_OUT set,
collection writes each test's kind there as JSON (tests/test_book_map.py reads it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.kinds import ENV, KINDS, NEED_KVM, GuestTrace, kinds_of

KVM_PRESENT = os.access("/dev/kvm", os.R_OK | os.W_OK)
_need_kvm: set[str] = set()
_ran: set[str] = set()
_trace: GuestTrace | None = None
_guest_fixtures: set[int] = set()  # id() of the FixtureDefs whose setup ran guest code
_before = pytest.StashKey[set[str]]()


@pytest.fixture(scope="session")
def needs_kvm() -> None:
    """Asked for by `simulation` tests that open /dev/kvm (see the module docstring)."""


def pytest_configure(config: pytest.Config) -> None:
    global _trace
    where = Path(tempfile.mkdtemp(prefix="pyhv-guest-ran-"))
    where.chmod(0o1777)  # jailed workers write their records as uids of their own
    os.environ[ENV] = str(where)
    _trace = GuestTrace(where)


def pytest_unconfigure(config: pytest.Config) -> None:
    where = os.environ.pop(ENV, None)
    if where:
        shutil.rmtree(where, ignore_errors=True)


def _kind(item: pytest.Item) -> str:
    k = kinds_of(item)
    return next(iter(k)) if len(k) == 1 else "?"


def _needs_kvm(item: pytest.Item) -> bool:
    return _kind(item) in NEED_KVM or "needs_kvm" in getattr(item, "fixturenames", ())


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    wrong = []
    for item in items:
        k = kinds_of(item)
        if len(k) != 1:
            has = f"has {' and '.join(sorted(k))} on one node" if k else "has none"
            wrong.append(f"  {item.nodeid}: {has}")
    if wrong:
        pytest.exit(
            f"every test needs exactly one kind marker of {', '.join(KINDS)} "
            "(see tests/conftest.py):\n" + "\n".join(wrong),
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
    if KVM_PRESENT:
        return
    skip = pytest.mark.skip(reason="/dev/kvm is missing or not accessible: this test needs KVM")
    for item in items:
        if _needs_kvm(item):
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    _need_kvm.update(i.nodeid for i in session.items if _needs_kvm(i))
    out = os.environ.get("PYHV_KINDS_OUT")
    if out:
        Path(out).write_text(json.dumps({i.nodeid: _kind(i) for i in session.items}))


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: Any) -> Any:
    before = _trace.snapshot() if _trace is not None else set()
    yield
    if _trace is not None and _trace.since(before):
        _guest_fixtures.add(id(fixturedef))


def _guest_fixtures_of(item: pytest.Item) -> list[str]:
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    return [
        name
        for name, defs in info.name2fixturedefs.items()
        if defs and id(defs[-1]) in _guest_fixtures
    ]


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> Any:
    assert _trace is not None
    item.stash[_before] = _trace.snapshot()
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    outcome = yield
    rep: pytest.TestReport = outcome.get_result()
    if rep.skipped and KVM_PRESENT and _needs_kvm(item) and not hasattr(rep, "wasxfail"):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"a test that needs KVM skipped although /dev/kvm is present: {reason}"
        return
    if rep.when != "call":
        return
    _ran.add(item.nodeid)
    if not rep.passed or _trace is None or _before not in item.stash:
        return
    kind = _kind(item)
    started = _trace.since(item.stash[_before])
    fixtures = _guest_fixtures_of(item)
    if kind == "guest" and not started and not fixtures:
        rep.outcome = "failed"
        rep.longrepr = (
            "marked guest but ran no guest code: no VP thread started during the test or its "
            "fixtures (see tests/conftest.py); give it the kind it has"
        )
    elif kind != "guest" and (started or fixtures):
        what = _trace.describe(started) if started else f"fixtures {', '.join(fixtures)}"
        rep.outcome = "failed"
        rep.longrepr = f"marked {kind} but ran guest code: mark it guest ({what})"


def kvm_line() -> str:
    m, n = len(_need_kvm), len(_ran & _need_kvm)
    if KVM_PRESENT:
        return f"KVM: present, ran {n} of {m} tests that need KVM"
    return (
        f"KVM: ABSENT, ran {n} of {m} tests that need KVM: {m - n} COULD NOT RUN without /dev/kvm"
    )


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> Any:
    yield  # after the terminal reporter's summary: the KVM line is the session's last line
    line = kvm_line()
    short = not KVM_PRESENT or len(_ran & _need_kvm) < len(_need_kvm)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line, bold=True, red=short)
    out = os.environ.get("PYHV_KVM_REPORT")
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
