"""Ownership moves by compare-and-swap and the owner key's revision is the fencing token; the
cluster balancer's leader is elected on a lease. Against a real etcd."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.cluster import election, ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.ownership import OwnershipConflict
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for

pytestmark = pytest.mark.unit


def test_ownership_moves_only_with_the_current_fencing_token(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        held = ownership.claim(etcd, "g", "a")
        assert ownership.owner(etcd, "g") == held
        with pytest.raises(OwnershipConflict, match="owned by a"):
            ownership.claim(etcd, "g", "b")
        moved = ownership.move(etcd, held, "b")
        assert moved.host == "b" and moved.token > held.token
        # Host a still holding the old token cannot move the VM back, nor release it.
        with pytest.raises(OwnershipConflict, match=f"token {held.token} is stale"):
            ownership.move(etcd, held, "a")
        with pytest.raises(OwnershipConflict, match="stale"):
            ownership.release(etcd, held)
        assert ownership.owner(etcd, "g") == moved
        ownership.release(etcd, moved)
        assert ownership.owner(etcd, "g") is None


def test_one_leader_at_a_time_and_the_next_wins_when_its_lease_ends(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        lease_a, lease_b = etcd.grant(2), etcd.grant(30)
        a = election.campaign(etcd, "a", lease_a)
        assert a is not None and election.leader(etcd) == ("a", a.term)
        assert election.campaign(etcd, "b", lease_b) is None
        assert election.still_leading(etcd, a)
        # a stops renewing: its lease expires, the key goes, b's next campaign wins.
        b = wait_for(lambda: election.campaign(etcd, "b", lease_b), 15, "b elected after a")
        assert b.term > a.term and not election.still_leading(etcd, a)
        assert not election.resign(etcd, a)
        assert election.resign(etcd, b) and election.leader(etcd) is None
