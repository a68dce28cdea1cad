"""HA restart's choices against a real etcd (no VMMS): which VMs are orphans (highly available,
desired running, owned by a host with no live record), a VM that fits nowhere is left where it is
with the shortfall named, and a restart whose owner token went stale (another leader restarted
it first) is left alone: ownership moves only by compare-and-swap."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyhv.cluster import election, ha, ownership
from pyhv.cluster.etcd import Etcd
from pyhv.cluster.provision import HostTokens, host_spaces
from pyhv.cluster.records import HostRecord, VmRecord, encode, vm_config_key
from tests.support.etcd import etcd_server

pytestmark = pytest.mark.unit

MIB = 1 << 20


def _vm(etcd: Etcd, name: str, owner: str, *, ha_: bool, desired: str, mib: int = 128) -> None:
    rec = VmRecord(name, {"name": name, "memory": mib * MIB}, desired, ha=ha_)
    etcd.put(vm_config_key(name), encode(rec))
    ownership.claim(etcd, name, owner)


def test_orphans_placement_shortfall_and_a_stale_token(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        _vm(etcd, "x", "dead", ha_=True, desired="running")
        _vm(etcd, "big", "dead", ha_=True, desired="running", mib=4096)
        _vm(etcd, "plain", "dead", ha_=False, desired="running")
        _vm(etcd, "stopped", "dead", ha_=True, desired="off")
        _vm(etcd, "fine", "b", ha_=True, desired="running")
        found = ha.orphans(etcd, {"b"})
        assert [o.record.name for o in found] == ["big", "x"]
        lease = etcd.grant(10)
        held = election.campaign(etcd, "b", lease)
        assert held is not None
        b = HostRecord("b", "127.0.0.1:1", "127.0.0.1", 2048 * MIB, 1024 * MIB, 256 * MIB)
        out = ha.restart_orphans(etcd, held, [b], {})
        big = next(r for r in out if r.vm == "big")
        assert big.state == "skipped" and "fits nowhere" in big.why
        assert "4096 MiB startup wanted" in big.why
        assert ownership.owner(etcd, "big") == found[0].held  # left where it was
        # Another leader restarted x first: the token read before is stale, x is left to it.
        x = found[1]
        ownership.move(etcd, x.held, "c")
        spaces = {s.name: s for s in host_spaces(etcd, [b])}
        r = ha.restart_one(etcd, x, spaces, {"b": b}, {"b": HostTokens("t")}, None)
        assert r.state == "skipped" and "stale" in r.why, r
        now = ownership.owner(etcd, "x")
        assert now is not None and now.host == "c"
        etcd.revoke(lease)
