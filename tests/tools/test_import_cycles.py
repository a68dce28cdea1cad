"""tools/import_cycles.py, the `make lint` check that no pyhv module imports itself back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TOOL = Path(__file__).resolve().parents[2] / "tools" / "import_cycles.py"


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def _check(root: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(TOOL), *options, str(root)], capture_output=True, text=True
    )


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "low.py": "def f():\n    from pkg.high import g\n    return g\n",
            "high.py": "from pkg import low\n\ng = 1\n",
        },
    )
    r = _check(root)
    assert r.returncode == 1
    assert "import circle among pkg.high, pkg.low" in r.stdout
    assert "pkg.low:2" in r.stdout  # the line of the late import


def test_a_relative_import_and_a_longer_circle_are_found(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "sub/__init__.py": "",
            "sub/a.py": "from .b import x\n",
            "sub/b.py": "from pkg.c import y\nx = 1\n",
            "c.py": "import pkg.sub.a\ny = 2\n",
        },
    )
    r = _check(root)
    assert r.returncode == 1
    assert "pkg.c, pkg.sub.a, pkg.sub.b" in r.stdout


def test_imports_for_the_type_checker_only_and_one_way_imports_pass(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "low.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.high import g\n"
            ),
            "high.py": "from pkg.low import TYPE_CHECKING\ng = 1\n",
        },
    )
    r = _check(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "no import circles among 3 modules" in r.stdout
    # --typing counts them too: the circle of annotations is shown
    r = _check(root, "--typing")
    assert r.returncode == 1
    assert "import circle among pkg.high, pkg.low" in r.stdout


def test_pyhv_has_no_import_circles() -> None:
    r = _check(TOOL.parents[1] / "pyhv")
    assert r.returncode == 0, r.stdout + r.stderr
