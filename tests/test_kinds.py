"""The suite's own rules (tests/conftest.py), run on small test files in a separate pytest: a test
needs exactly one kind, a `guest` test that ran no guest code fails, a KVM test that skips where
/dev/kvm is present fails, and the session's last line counts the KVM tests that ran."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_suite(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    """pytest on `source` as test_x.py, with this suite's conftest and markers."""
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "test_x.py").write_text(source)
    report = tmp_path / "kvm-report"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PYHV_KVM_REPORT": str(report),
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", tmp_path],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.unit
def test_a_test_without_a_kind_or_with_two_stops_the_collection_naming_it(tmp_path: Path) -> None:
    r = run_suite(
        tmp_path,
        "import pytest\n\n"
        "def test_none():\n    pass\n\n"
        "@pytest.mark.unit\n@pytest.mark.guest\ndef test_two():\n    pass\n\n"
        "@pytest.mark.unit\ndef test_one():\n    pass\n",
    )
    assert r.returncode == pytest.ExitCode.USAGE_ERROR, r.stdout
    assert "test_x.py::test_none: has none" in r.stdout
    assert "test_x.py::test_two: has guest and unit on one node" in r.stdout
    assert "test_one" not in r.stdout


@pytest.mark.unit
def test_an_unregistered_marker_is_refused(tmp_path: Path) -> None:
    r = run_suite(tmp_path, "import pytest\n\n@pytest.mark.gest\ndef test_typo():\n    pass\n")
    assert r.returncode != 0 and "'gest' not found in `markers`" in r.stdout + r.stderr


@pytest.mark.kvm
def test_a_guest_test_without_guest_code_and_a_kvm_test_that_skips_both_fail(
    tmp_path: Path,
) -> None:
    r = run_suite(
        tmp_path,
        "import pytest\n\n"
        "pytestmark = pytest.mark.guest\n\n"
        "def test_claims_a_guest():\n    pass\n\n"
        "@pytest.mark.kvm\ndef test_skips():\n    pytest.skip('no reason')\n\n"
        "@pytest.mark.unit\ndef test_pure():\n    pass\n",
    )
    assert r.returncode == pytest.ExitCode.TESTS_FAILED, r.stdout
    assert "2 failed, 1 passed" in r.stdout
    assert "marked guest but ran no guest code" in r.stdout
    assert "needs KVM skipped although /dev/kvm is present: Skipped: no reason" in r.stdout
    last = r.stdout.rstrip("\n").splitlines()[-1]
    assert last == "KVM: present, ran 1 of 2 tests that need KVM"  # the skip did not run
    assert (tmp_path / "kvm-report").read_text() == last + "\n"
