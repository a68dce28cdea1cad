"""The cluster store against a real etcd (Debian's etcd 3.4, started per test): keys, prefixes,
compare-and-swap, leases that expire, watches, and a clear error when etcd does not answer."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from pyhv.cluster.etcd import Etcd, EtcdUnavailable, WatchEvent, parse_endpoints
from pyhv.cluster.records import HostRecord, RecordError, decode, encode, host_key
from tests.support.etcd import etcd_server
from tests.support.wait import wait_for

pytestmark = pytest.mark.unit


def test_keys_prefixes_and_compare_and_swap(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        assert etcd.get("/t/a") is None
        rev = etcd.put("/t/a", "1")
        etcd.put("/t/b", "2")
        etcd.put("/u/c", "3")
        kv = etcd.get("/t/a")
        assert kv is not None and kv.value == "1" and kv.mod_revision == rev
        kvs, _ = etcd.get_prefix("/t/")
        assert [(k.key, k.value) for k in kvs] == [("/t/a", "1"), ("/t/b", "2")]
        # A swap from a stale revision fails and shows the current entry; from the right one
        # it succeeds and moves the revision on (the fencing token).
        stale = etcd.swap("/t/a", "x", rev - 1)
        assert not stale.succeeded and stale.current is not None
        assert stale.current.value == "1"
        ok = etcd.swap("/t/a", "x", rev)
        assert ok.succeeded and ok.revision > rev
        assert not etcd.swap("/t/new", "y", 1).succeeded
        assert etcd.swap("/t/new", "y", 0).succeeded  # create only if absent
        assert not etcd.swap("/t/new", "z", 0).succeeded
        assert etcd.delete("/t/", prefix=True) == 3
        assert etcd.get_prefix("/t/")[0] == []


def test_a_key_under_a_lease_goes_when_the_lease_expires_or_is_revoked(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        short = etcd.grant(2)
        etcd.put("/l/short", "v", lease=short)
        kv = etcd.get("/l/short")
        assert kv is not None and kv.lease == short
        assert etcd.keepalive(short) == 2
        wait_for(lambda: etcd.get("/l/short") is None, 10, "the key of an expired lease gone")
        assert etcd.keepalive(short) == 0  # an expired lease is not renewed
        other = etcd.grant(30)
        etcd.put("/l/other", "v", lease=other)
        etcd.revoke(other)
        assert etcd.get("/l/other") is None
        etcd.revoke(other)  # revoking twice is no error


def test_a_watch_sees_puts_and_deletes_under_its_prefix(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server, Etcd(server.endpoint) as etcd:
        start = etcd.put("/w/a", "1")
        seen: list[WatchEvent] = []
        done = threading.Event()

        def watch() -> None:
            for ev in etcd.watch("/w/", start_revision=start, timeout=20):
                seen.append(ev)
                if ev.kind == "delete":
                    done.set()
                    return

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        etcd.put("/other", "not watched")
        etcd.put("/w/b", "2")
        etcd.delete("/w/a")
        assert done.wait(20), seen
        assert [(e.kind, e.kv.key) for e in seen] == [
            ("put", "/w/a"),
            ("put", "/w/b"),
            ("delete", "/w/a"),
        ]


def test_an_unreachable_etcd_is_a_clear_error(tmp_path: Path) -> None:
    with etcd_server(tmp_path) as server:
        endpoint = server.endpoint
        with Etcd(endpoint, timeout=1.0) as etcd:
            server.pause()
            try:
                with pytest.raises(EtcdUnavailable, match="check that etcd runs"):
                    etcd.get("/x")
            finally:
                server.resume()
            assert etcd.get("/x") is None
    with Etcd(endpoint, timeout=1.0) as etcd, pytest.raises(EtcdUnavailable, match=endpoint):
        etcd.put("/x", "1")
    with pytest.raises(ValueError, match="not http://HOST:PORT"):
        parse_endpoints("ftp://a:1")
    assert parse_endpoints("127.0.0.1:2379, http://h:1/") == [
        "http://127.0.0.1:2379",
        "http://h:1",
    ]


def test_a_record_another_host_wrote_is_checked(tmp_path: Path) -> None:
    record = HostRecord(
        name="h1", api="127.0.0.1:1", migration="127.0.0.1", total=1, free=1, reserve=0
    )
    assert decode(host_key("h1"), encode(record), HostRecord) == record
    with pytest.raises(RecordError, match="/pyhv/hosts/h1 does not hold a valid HostRecord"):
        decode(host_key("h1"), '{"name": "h1", "total": -1}', HostRecord)
    bad_api = encode(record).replace("127.0.0.1:1", "127.0.0.1:1/../x")
    with pytest.raises(RecordError, match=r"\$\.api"):
        decode(host_key("h1"), bad_api, HostRecord)
