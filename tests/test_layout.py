"""The tests' own layout, so a newcomer finds their way: no test module imports another test
module (helpers shared by several files live in tests/support, tests/guests or a folder's helper
module), and every test guest's source is in tests/guests, built by tests/guests/build.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parent
#: The one exception: it reruns the intercept and VP tests of its folder on the Python run loop,
#: so it imports those modules by design (see its docstring).
RERUNS = {TESTS / "hypervisor" / "test_run_loops.py"}


def _is_test_module(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "tests" and parts[-1].startswith("test_")


def imported_test_modules(source: str) -> list[str]:
    """The test modules (`tests.*.test_*`) a module's source imports, at any level."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _is_test_module(node.module):
                found.append(node.module)
            else:  # `from tests.hypervisor import test_io_intercepts`
                found += [
                    f"{node.module}.{a.name}"
                    for a in node.names
                    if _is_test_module(f"{node.module}.{a.name}")
                ]
    return found


def test_the_check_sees_each_way_of_importing_a_test_module() -> None:
    source = (
        "import tests.vmms.test_api\n"
        "from tests.worker.test_boot import make_elf\n"
        "from tests.hypervisor import test_io_intercepts, harness\n"
        "def f():\n    from tests.dynmem import test_vsp\n"
        "from tests.support.wait import wait_for\nimport pytest\n"
    )
    assert imported_test_modules(source) == [
        "tests.vmms.test_api",
        "tests.worker.test_boot",
        "tests.hypervisor.test_io_intercepts",
        "tests.dynmem.test_vsp",
    ]


def test_no_test_module_imports_another_test_module() -> None:
    offenders = {
        str(path.relative_to(TESTS.parent)): found
        for path in sorted(TESTS.rglob("test_*.py"))
        if path not in RERUNS and (found := imported_test_modules(path.read_text()))
    }
    assert not offenders, (
        f"test modules import other test modules: {offenders}; move the shared helper into "
        "tests/support/, tests/guests/ or a helper module of its folder"
    )


def test_every_test_guest_source_is_in_tests_guests() -> None:
    guests = TESTS / "guests"
    elsewhere = [
        str(p.relative_to(TESTS.parent))
        for pattern in ("*.S", "*.ld")
        for p in TESTS.rglob(pattern)
        if p.parent != guests
    ]
    assert not elsewhere, f"test guest sources outside tests/guests/: {elsewhere}; move them there"
