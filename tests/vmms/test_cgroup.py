"""A worker's memory cgroup behind one class, for cgroup v1 (this machine: the real kernel
files) and v2 (a directory laid out as the unified hierarchy)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pyhv.vmms.cgroup import MemoryCgroup, memory_hierarchy

pytestmark = pytest.mark.unit


def test_a_real_memory_cgroup_is_made_limited_joined_read_and_removed() -> None:
    version, _ = memory_hierarchy()
    g = MemoryCgroup.create("pyhv-test-cgroup", 64 << 20)
    try:
        assert g.limit() == 64 << 20
        g.set_limit(80 << 20)
        assert g.limit() == 80 << 20
        p = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
        )
        try:
            g.add(p.pid)
            assert str(p.pid) in (g.path / "cgroup.procs").read_text().split()
            assert g.usage() >= 0 and g.oom_kills() == 0
        finally:
            p.kill()
            p.wait()
    finally:
        g.remove()
    assert not g.path.exists(), version


def test_cgroup_v2_files_are_used_where_the_unified_hierarchy_has_the_memory_controller(
    tmp_path: Path,
) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    version, parent = memory_hierarchy(tmp_path)
    assert version == 2 and parent.name == "pyhv-workers"
    g = MemoryCgroup.create("vm1", 100 << 20, root=tmp_path)
    assert (g.path / "memory.max").read_text() == str(100 << 20)
    (g.path / "memory.current").write_text("12345\n")
    (g.path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    assert g.usage() == 12345 and g.oom_kills() == 1
    (g.path / "memory.max").write_text("max\n")
    assert g.limit() == (1 << 63) - 1
