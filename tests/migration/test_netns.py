"""Two hosts on one machine: the source and destination workers run in two network namespaces
joined by a veth pair, so the migration stream crosses a real (virtual) interface."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from pyhv.migration.worker import migrate_worker
from tests.migration.conftest import TOKEN, moved, wait_rising

pytestmark = pytest.mark.guest


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_namespaces() -> Iterator[tuple[str, str, str]]:
    """(source namespace, destination namespace, destination address), made for this test."""
    tag = os.getpid() % 10000
    net = os.getpid() % 250 + 1
    a, b = f"pyhv-mig-a{tag}", f"pyhv-mig-b{tag}"
    try:
        made = _ip("netns", "add", a)
    except FileNotFoundError:
        pytest.fail("the `ip` command is missing: install iproute2 (.ci/run does)")
    if made.returncode != 0:
        pytest.fail(f"`ip netns add` failed (the test needs root): {made.stderr.strip()}")
    try:
        steps = [
            ("netns", "add", b),
            (
                "link",
                "add",
                f"pmg{tag}a",
                "netns",
                a,
                "type",
                "veth",
                "peer",
                "name",
                f"pmg{tag}b",
                "netns",
                b,
            ),
            ("-n", a, "addr", "add", f"10.200.{net}.1/24", "dev", f"pmg{tag}a"),
            ("-n", b, "addr", "add", f"10.200.{net}.2/24", "dev", f"pmg{tag}b"),
            ("-n", a, "link", "set", f"pmg{tag}a", "up"),
            ("-n", b, "link", "set", f"pmg{tag}b", "up"),
            ("-n", a, "link", "set", "lo", "up"),
            ("-n", b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            assert r.returncode == 0, f"ip {' '.join(step)}: {r.stderr}"
        yield a, b, f"10.200.{net}.2"
    finally:
        _ip("netns", "del", a)
        _ip("netns", "del", b)


def test_a_vm_migrates_between_two_network_namespaces_over_a_veth_pair(
    hosts: Any, two_namespaces: tuple[str, str, str]
) -> None:
    ns_a, ns_b, dest_ip = two_namespaces
    src, guest = hosts.boot("128M", prefix=["ip", "netns", "exec", ns_a])
    guest.run("dirty 8")
    dst = hosts.destination(prefix=["ip", "netns", "exec", ns_b], listen=(dest_ip, 0))
    host, port = dst.wait_listening()
    assert host == dest_ip
    result = migrate_worker(src, (host, port), TOKEN, {"verify": True})
    assert dst.wait_migrated(30) is not None
    assert dst.migrated is not None and dst.migrated["source"].startswith("10.200.")
    assert result["pages_sent"] >= 8 * 256
    first, later = wait_rising(moved(dst).touched)
    assert later > first
    end = src.wait(30)
    assert end is not None and f"migrated to {dest_ip}" in end.detail
