"""The cluster balancer as a pure policy over a snapshot: a short host's VM moves to the host
with room, the one with most relief per byte moved first, within the limits (in flight per host
and cluster, minimum interval per VM, hysteresis); a user's policy is loaded from a file and
every plan is checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pyhv.cluster.balancer import CostRelief
from pyhv.cluster.policies import load_policy
from pyhv.cluster.policy import (
    ClusterSnapshot,
    Limits,
    Move,
    Plan,
    PolicyError,
    check_plan,
)
from pyhv.cluster.records import HostRecord, VmSummary
from pyhv.cluster.snapshot import snapshot as from_records

pytestmark = pytest.mark.unit

G = 1 << 30


def snapshot(
    capacity: list[float],
    vms: list[tuple[int, float, float]],  # host, assigned GiB, target GiB
    dirty: list[float] | None = None,
    last_moved: list[float] | None = None,
    moving: tuple[list[int], list[int]] = ([], []),
    now: float = 10_000.0,
) -> ClusterSnapshot:
    n = len(vms)
    return ClusterSnapshot(
        now=now,
        hosts=tuple(f"h{i}" for i in range(len(capacity))),
        capacity=np.array([c * G for c in capacity], dtype=np.int64),
        vm_ids=tuple(f"v{i}" for i in range(n)),
        vm_host=np.array([v[0] for v in vms], dtype=np.intp),
        assigned=np.array([v[1] * G for v in vms], dtype=np.int64),
        target=np.array([v[2] * G for v in vms], dtype=np.int64),
        minimum=np.full(n, G // 2, dtype=np.int64),
        dirty_bytes_per_s=np.array(dirty or [0.0] * n, dtype=np.float64),
        last_moved=np.array(last_moved or [-np.inf] * n, dtype=np.float64),
        moving=np.array(moving[0], dtype=np.intp),
        moving_to=np.array(moving[1], dtype=np.intp),
    )


def test_a_short_host_moves_the_vm_with_most_relief_per_byte_to_the_host_with_room() -> None:
    # h0: 8 GiB, targets 4 + 3 + 2 = 9 GiB (1 GiB short). h1 has 6 GiB of room, h2 3 GiB.
    s = snapshot([8, 8, 8], [(0, 4, 4), (0, 3, 3), (0, 2, 2), (1, 2, 2), (2, 5, 5)])
    plan = CostRelief(Limits()).plan(s)
    # v2 (2 GiB) relieves the whole 1 GiB deficit for the fewest bytes.
    assert [(m.vm, m.source, m.destination) for m in plan.moves] == [("v2", "h0", "h1")]
    assert plan.moves[0].relief == G and plan.moves[0].bytes == 2 * G
    assert check_plan(s, plan, Limits()) == list(plan.moves)


def test_a_fast_dirtying_vm_costs_more_and_one_that_never_converges_stays() -> None:
    lim = Limits(bandwidth_bytes_per_s=G)
    s = snapshot([8, 8], [(0, 3, 3), (0, 3, 3), (0, 3, 3)], dirty=[0.9 * G, 0.5 * G, 0.0])
    (move,) = CostRelief(lim).plan(s).moves
    assert move.vm == "v2"  # same relief, no dirtying
    s = snapshot([8, 8], [(0, 3, 3), (0, 3, 3), (0, 3, 3)], dirty=[0.9 * G, 0.5 * G, 0.85 * G])
    (move,) = CostRelief(lim).plan(s).moves
    assert move.vm == "v1" and move.bytes == 6 * G  # 3 GiB / (1 - 0.5)


def test_hysteresis_limits_and_the_minimum_interval() -> None:
    # 1 % over: not short under the default 2 % threshold.
    s = snapshot([100, 100], [(0, 50, 50), (0, 51, 51)])
    assert CostRelief(Limits()).plan(s).moves == ()
    # Two short hosts, one migration per host at a time, two in the cluster at most.
    s = snapshot([8, 8, 8, 20], [(0, 5, 5), (0, 5, 5), (1, 5, 5), (1, 5, 5), (2, 5, 5), (2, 5, 5)])
    plan = CostRelief(Limits(in_flight_per_host=1, in_flight_cluster=2)).plan(s)
    assert len(plan.moves) == 1  # only h3 has room, and it takes one at a time
    plan = CostRelief(Limits(in_flight_per_host=3, in_flight_cluster=2)).plan(s)
    assert len(plan.moves) == 2 and {m.destination for m in plan.moves} == {"h3"}
    # VMs moved within the interval stay.
    s = snapshot([8, 8], [(0, 5, 5), (0, 5, 5)], last_moved=[9_500.0, 9_000.0], now=10_000.0)
    assert CostRelief(Limits(min_interval_s=1800)).plan(s).moves == ()
    # No host with room: the plan says so.
    s = snapshot([8, 8], [(0, 5, 5), (0, 5, 5), (1, 7, 7)])
    plan = CostRelief(Limits()).plan(s)
    assert plan.moves == () and "no host has room" in plan.notes[0]


def test_every_plan_is_checked_against_the_limits() -> None:
    s = snapshot([8, 8], [(0, 5, 5), (0, 5, 5)], last_moved=[-np.inf, 9_900.0], moving=([0], [1]))
    lim = Limits(in_flight_per_host=2)
    with pytest.raises(PolicyError, match="does not have"):
        check_plan(s, Plan((Move("nope", "h0", "h1"),)), lim)
    with pytest.raises(PolicyError, match="moving already"):
        check_plan(s, Plan((Move("v0", "h0", "h1"),)), lim)
    with pytest.raises(PolicyError, match="after its last move"):
        check_plan(s, Plan((Move("v1", "h0", "h1"),)), lim)
    with pytest.raises(PolicyError, match="to the host it runs on"):
        check_plan(s, Plan((Move("v1", "h0", "h0"),)), lim)
    with pytest.raises(PolicyError, match="but it runs on h0"):
        check_plan(s, Plan((Move("v1", "h1", "h0"),)), lim)


def test_a_users_policy_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "biggest_first.py"
    f.write_text(
        "from pyhv.cluster.policy import Move, Plan\n"
        "def plan(s):\n"
        "    d = s.deficit()\n"
        "    h = int(d.argmax())\n"
        "    if d[h] <= 0:\n"
        "        return Plan()\n"
        "    on = (s.vm_host == h).nonzero()[0]\n"
        "    v = int(on[s.assigned[on].argmax()])\n"
        "    dest = int(d.argmin())\n"
        "    return Plan((Move(s.vm_ids[v], s.hosts[h], s.hosts[dest], int(s.assigned[v])),))\n"
    )
    policy = load_policy(str(f))
    s = snapshot([8, 8], [(0, 3, 3), (0, 6, 6)])
    assert [m.vm for m in policy.plan(s).moves] == ["v1"]
    assert load_policy("host-only").plan(s).moves == ()
    with pytest.raises(PolicyError, match="not found"):
        load_policy(str(tmp_path / "missing.py"))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(PolicyError, match="defines no `policy`"):
        load_policy(str(tmp_path / "empty.py"))


def test_a_vm_that_just_moved_counts_only_at_its_owner() -> None:
    g = VmSummary("g", assigned=G, startup=G, minimum=G // 2, maximum=2 * G, target=G)
    a = HostRecord("a", "", "", total=4 * G, free=2 * G, reserve=0, vms=[g])
    b = HostRecord("b", "", "", total=4 * G, free=2 * G, reserve=0, vms=[g])  # not republished
    s = from_records([a, b], owners={"g": "b"})
    assert s.vm_ids == ("g",) and s.hosts[s.vm_host[0]] == "b"
    assert from_records([a, b]).vm_ids == ("g",)  # no owner key: counted once
