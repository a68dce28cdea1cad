"""Shared test setup: the `kvm` marker skips where /dev/kvm is missing, and the session
reports how many KVM tests really ran (read by .ci/run)."""

from __future__ import annotations

import os

import pytest

KVM_PRESENT = os.access("/dev/kvm", os.R_OK | os.W_OK)
_kvm_ran = 0
_kvm_tests: set[str] = set()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _kvm_tests.update(i.nodeid for i in items if i.get_closest_marker("kvm") is not None)
    if KVM_PRESENT:
        return
    skip = pytest.mark.skip(
        reason="/dev/kvm is missing or not accessible: this test runs real guests"
    )
    for item in items:
        if item.get_closest_marker("kvm") is not None:
            item.add_marker(skip)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    global _kvm_ran
    if report.when == "call" and report.nodeid in _kvm_tests and not report.skipped:
        _kvm_ran += 1


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    line = f"KVM: {'present' if KVM_PRESENT else 'absent'}, {_kvm_ran} tests needed it"
    terminalreporter.write_line(line)
    out = os.environ.get("PYHV_KVM_REPORT")
    if out:
        with open(out, "w") as f:
            f.write(line + "\n")
