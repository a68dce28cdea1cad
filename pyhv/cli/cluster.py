"""`pyhv cluster ...`: the fleet simulator (`simulate`), the live hosts (`hosts`), the cluster
balancer (`balance [--dry-run]`), the cluster CA (`init`, `add-host`); and `pyhv vm list/show
--cluster`, `pyhv vm create --cluster` (where VMs of the cluster run). docs/cluster.md."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cluster",
        help="pyhv on many hosts: fleet simulator, cluster balancer (docs/cluster.md)",
        description="pyhv on many hosts (docs/cluster.md).",
    )
    cmds = p.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    s = cmds.add_parser(
        "simulate",
        help="run placement and the balancers on a simulated fleet",
        description="Run the same placement, host balancer and cluster balancing policies on "
        "simulated hosts and VMs driven by a workload trace, compressed in time; compare the "
        "policies side by side (table, CSV, PNG).",
    )
    s.add_argument("--hosts", type=int, default=100, help="hosts (default 100)")
    s.add_argument(
        "--vms",
        type=int,
        default=10000,
        help="VMs of the synthetic trace (default 10000; a --trace brings its own)",
    )
    s.add_argument("--hours", type=float, default=24.0, help="simulated hours (default 24)")
    s.add_argument(
        "--policy",
        action="append",
        metavar="P",
        help="host-only, cluster, a .py file or module[:attribute] (repeat to compare; "
        "default: host-only and cluster)",
    )
    s.add_argument("--seed", type=int, default=1, help="the synthetic trace's seed (default 1)")
    s.add_argument(
        "--trace",
        type=Path,
        metavar="CSV",
        help="committed memory per VM over time (rows time_s,vm,committed_bytes) instead of "
        "the synthetic trace",
    )
    s.add_argument(
        "--host-memory",
        type=types.size,
        metavar="SIZE",
        help="each host's memory for VMs (default: the fleet's startup memory fills the hosts)",
    )
    s.add_argument(
        "--step",
        type=float,
        default=60.0,
        help="simulated seconds per host-balancer tick (default 60)",
    )
    s.add_argument(
        "--cluster-every",
        type=float,
        default=300.0,
        metavar="S",
        help="simulated seconds between two cluster balancer decisions (default 300)",
    )
    s.add_argument(
        "--out",
        type=Path,
        default=Path("cluster-simulation"),
        metavar="PREFIX",
        help="writes PREFIX.csv and PREFIX.png (default %(default)s)",
    )
    s.set_defaults(func=simulate_command)
    h = cmds.add_parser(
        "hosts",
        help="the live hosts of a cluster and their capacity",
        description="The live hosts (their records in etcd): memory, free pool, VMs, pressure, "
        "and who leads the cluster balancer.",
    )
    h.add_argument(
        "--cluster", required=True, metavar="ENDPOINTS", help="etcd: http://HOST:PORT[,...]"
    )
    h.add_argument("--json", dest="as_json", action="store_true", help="print the records as JSON")
    h.set_defaults(func=hosts_command)
    b = cmds.add_parser(
        "balance",
        help="the cluster balancer: plan live migrations and carry them out (or --dry-run)",
        description="Campaign for the cluster balancer's leadership (a lease in etcd); as leader, "
        "read the hosts' records, print the plan of live migrations the policy makes and carry "
        "it out (each move a live migration between two hosts' VMMS), unless --dry-run.",
    )
    b.add_argument(
        "--cluster", required=True, metavar="ENDPOINTS", help="etcd: http://HOST:PORT[,...]"
    )
    b.add_argument(
        "--policy",
        default="cluster",
        metavar="P",
        help="host-only, cluster (default), a .py file or module[:attribute]",
    )
    b.add_argument(
        "--as",
        dest="as_name",
        default="pyhv-cli",
        metavar="NAME",
        help="the name to lead under (default pyhv-cli)",
    )
    b.add_argument("--dry-run", action="store_true", help="print the plan and do nothing")
    b.add_argument(
        "--tokens",
        type=Path,
        metavar="FILE",
        help="the hosts' API tokens, lines `HOST CLUSTER_TOKEN [MIGRATION_TOKEN]` (default $PYHV_CLUSTER_TOKENS)",
    )
    b.set_defaults(func=balance_command)
    i = cmds.add_parser(
        "init",
        help="make the cluster's CA (for mutual TLS between hosts)",
        description="Make a cluster CA in DIR (ca.pem, and ca.key readable by its owner only); "
        "`pyhv cluster add-host NAME --ca DIR` signs each host's certificate with it.",
    )
    i.add_argument("dir", type=Path, metavar="DIR", help="where the CA goes (created)")
    i.set_defaults(func=init_command)
    ah = cmds.add_parser(
        "add-host",
        help="a host's certificate, signed by the cluster CA",
        description="Make host NAME's certificate and key (DIR/NAME.pem, DIR/NAME.key), signed "
        "by the cluster CA in DIR, good as a TLS server's and a client's: serve with `pyhv vmms "
        "serve --tls-cert DIR/NAME.pem --tls-key DIR/NAME.key --tls-client-ca DIR/ca.pem`.",
    )
    ah.add_argument("name", metavar="NAME", help="the host's name in the cluster")
    ah.add_argument("--ca", type=Path, required=True, metavar="DIR", help="the cluster CA's DIR")
    ah.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="IP",
        help="an IP address other hosts reach it at (repeatable; 127.0.0.1 is always in)",
    )
    ah.set_defaults(func=add_host_command)


def simulate_command(a: argparse.Namespace) -> int:
    from pyhv.cluster.policies import load_policy
    from pyhv.cluster.policy import PolicyError
    from pyhv.cluster.simreport import table, write_csv, write_png
    from pyhv.cluster.simulator import SimConfig, SimulationError, simulate_many
    from pyhv.cluster.workloads import TraceError, from_csv, synthetic

    try:
        policies = [load_policy(p) for p in (a.policy or ["host-only", "cluster"])]
        config = SimConfig(
            hosts=a.hosts,
            hours=a.hours,
            step_s=a.step,
            cluster_every_s=a.cluster_every,
            host_memory=a.host_memory or 0,
        )
        if a.vms < 1:
            raise SimulationError(f"--vms {a.vms}: give 1 or more")
        fleet = from_csv(a.trace) if a.trace else synthetic(a.vms, a.seed, a.hours)
        results = simulate_many(fleet, policies, config)
    except (PolicyError, SimulationError, TraceError, ValueError) as e:
        raise CliError(str(e), 2) from None
    print(table(results), end="")
    csv_path, png_path = a.out.with_suffix(".csv"), a.out.with_suffix(".png")
    try:
        if a.out.parent != Path(""):
            a.out.parent.mkdir(parents=True, exist_ok=True)
        write_csv(results, csv_path)
        write_png(results, png_path)
    except OSError as e:
        raise CliError(f"cannot write {csv_path} / {png_path}: {e}") from None
    print(f"wrote {csv_path} and {png_path}", file=sys.stderr)
    print(json.dumps({"results": [r.summary() for r in results]}))
    return 0


def init_command(a: argparse.Namespace) -> int:
    from pyhv.cluster.pki import PkiError, init

    try:
        cert = init(a.dir)
    except PkiError as e:
        raise CliError(str(e)) from None
    print(f"cluster CA: {cert} (its key {a.dir / 'ca.key'}: keep it off the hosts)")
    return 0


def add_host_command(a: argparse.Namespace) -> int:
    from pyhv.cluster.pki import PkiError, add_host, fingerprint

    try:
        cert, key = add_host(a.ca, a.name, tuple(a.address))
    except PkiError as e:
        raise CliError(str(e), 2 if "host name" in str(e) else 1) from None
    print(f"host {a.name}: certificate {cert}, key {key}, SHA-256 {fingerprint(cert)}")
    return 0


def hosts_command(a: argparse.Namespace) -> int:
    import time

    import msgspec

    from pyhv.cluster import election
    from pyhv.cluster.etcd import Etcd, EtcdError
    from pyhv.cluster.records import RecordError
    from pyhv.cluster.snapshot import read_hosts

    try:
        etcd = Etcd(a.cluster)
    except ValueError as e:
        raise CliError(str(e), 2) from None
    try:
        hosts = read_hosts(etcd)
        lead = election.leader(etcd)
    except (EtcdError, RecordError) as e:
        raise CliError(str(e)) from None
    finally:
        etcd.close()
    if a.as_json:
        print(json.dumps({"hosts": msgspec.to_builtins(hosts), "leader": lead and lead[0]}))
        return 0
    print(f"{'HOST':<12} {'API':<21} {'MEMORY':>8} {'FREE':>8} {'VMS':>4} {'PRESSURE':>9} STATE")
    for r in hosts:
        state = "short" if r.pressure.short else "ok"
        age = time.time() - r.published
        print(
            f"{r.name:<12} {r.api or '-':<21} {(r.total - r.reserve) >> 20:>6}Mi "
            f"{r.free >> 20:>6}Mi {len(r.vms):>4} {r.pressure.highest:>8.0f}% {state}"
            + (f" (published {age:.0f} s ago)" if age > 10 else "")
        )
    print(f"{len(hosts)} hosts; cluster balancer leader: {lead[0] if lead else 'none'}")
    return 0


def balance_command(a: argparse.Namespace) -> int:
    import threading

    from pyhv.cli.vmms import client_tls
    from pyhv.cluster import election, provision
    from pyhv.cluster.etcd import Etcd, EtcdError
    from pyhv.cluster.executor import execute
    from pyhv.cluster.leader import decide
    from pyhv.cluster.policies import load_policy
    from pyhv.cluster.policy import Limits, PolicyError
    from pyhv.cluster.records import RecordError

    try:
        policy = load_policy(a.policy)
        tokens = {} if a.dry_run else provision.read_tokens(a.tokens)
        etcd = Etcd(a.cluster)
    except (PolicyError, ValueError) as e:
        raise CliError(str(e), 2) from None
    except provision.ProvisionError as e:
        raise CliError(str(e)) from None
    stop = threading.Event()
    try:
        lease = etcd.grant(LEADER_TTL_S)

        def keep() -> None:  # the leader keeps its lease while its moves run
            while not stop.wait(LEADER_TTL_S / 3):
                try:
                    etcd.keepalive(lease)
                except EtcdError:
                    pass

        keeper = threading.Thread(target=keep, name="cluster-leader-lease", daemon=True)
        keeper.start()
        try:
            held = election.campaign(etcd, a.as_name, lease)
            if held is None:
                now = election.leader(etcd)
                who = f"{now[0]} (term {now[1]})" if now else "another host"
                raise CliError(f"{who} leads the cluster balancer: its plans rule; try again later")
            try:
                d = decide(etcd, policy, Limits())
                hosts, moves = d.hosts, d.moves
                _print_plan(d.snapshot, moves, d.plan.notes)
                outcomes = []
                if not a.dry_run and moves:
                    outcomes = execute(
                        etcd,
                        held,
                        moves,
                        {h.name: h for h in hosts},
                        tokens,
                        tls=client_tls(a),
                        report=lambda o: print(
                            f"{o.state} {o.move.vm}: {o.move.source} -> {o.move.destination} "
                            f"in {o.seconds} s" + (f": {o.why}" if o.why else ""),
                            flush=True,
                        ),
                    )
            finally:
                election.resign(etcd, held)
        finally:
            stop.set()
            keeper.join()
            etcd.revoke(lease)
    except (EtcdError, RecordError, PolicyError) as e:
        raise CliError(str(e)) from None
    finally:
        etcd.close()
    print(
        json.dumps(
            {
                "leader": held.host,
                "term": held.term,
                "policy": getattr(policy, "name", a.policy),
                "dry_run": a.dry_run,
                "moves": [
                    {"vm": m.vm, "from": m.source, "to": m.destination, "bytes": m.bytes}
                    for m in moves
                ],
                "outcomes": [{"vm": o.move.vm, "state": o.state, "why": o.why} for o in outcomes],
            }
        )
    )
    return 0 if all(o.state == "done" for o in outcomes) else 1


#: The balancer leader's lease: a leader that dies is replaced within this many seconds.
LEADER_TTL_S = 10


def _print_plan(snap: Any, moves: list[Any], notes: tuple[str, ...]) -> None:
    for h, d in zip(snap.hosts, snap.deficit().tolist(), strict=True):
        state = f"short by {d >> 20} MiB" if d > 0 else f"{-d >> 20} MiB room"
        print(f"host {h}: {state}")
    for m in moves:
        print(
            f"move {m.vm}: {m.source} -> {m.destination} ({m.bytes >> 20} MiB to send, "
            f"relieves {m.relief >> 20} MiB)"
        )
    for note in notes:
        print(f"note: {note}")
    if not moves:
        print("no move: every host meets its VMs' targets" if not notes else "no move")


def create_in_cluster(a: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    """`pyhv vm create NAME --cluster ENDPOINTS`: placed, recorded and created on its host."""
    from pyhv.cli.vmms import client_tls
    from pyhv.cluster import provision
    from pyhv.cluster.etcd import Etcd, EtcdError
    from pyhv.cluster.placement import NoPlacement
    from pyhv.cluster.records import RecordError

    try:
        tokens = provision.read_tokens(a.tokens)
        etcd = Etcd(a.cluster)
    except provision.ProvisionError as e:
        raise CliError(str(e)) from None
    except ValueError as e:
        raise CliError(str(e), 2) from None
    try:
        host, vm = provision.create(
            etcd, body, tokens, tuple(a.affinity), tuple(a.anti_affinity), a.ha, client_tls(a)
        )
    except (provision.ProvisionError, NoPlacement, EtcdError, RecordError) as e:
        raise CliError(str(e)) from None
    finally:
        etcd.close()
    print(f"placed on host {host}", file=sys.stderr)
    return dict(vm, host=host)


def _cluster_vms(endpoints: str) -> tuple[list[dict[str, Any]], set[str]]:
    """Every VM of the cluster (its record, owner and token, whether its owner's record lists
    it running, its history) and the live hosts."""
    import msgspec

    from pyhv.cluster import history
    from pyhv.cluster.etcd import Etcd, EtcdError
    from pyhv.cluster.records import VMS, RecordError, VmRecord, decode
    from pyhv.cluster.snapshot import read_hosts

    try:
        etcd = Etcd(endpoints)
    except ValueError as e:
        raise CliError(str(e), 2) from None
    try:
        hosts = read_hosts(etcd)
        kvs, _ = etcd.get_prefix(VMS)
        vms: dict[str, dict[str, Any]] = {}
        for kv in kvs:
            vm, _, leaf = kv.key[len(VMS) :].partition("/")
            if leaf == "config":
                vms.setdefault(vm, {}).update(
                    msgspec.to_builtins(decode(kv.key, kv.value, VmRecord))
                )
            elif leaf == "owner":
                vms.setdefault(vm, {}).update(owner=kv.value, token=kv.mod_revision)
        running = {(h.name, v.name) for h in hosts for v in h.vms}
        out = []
        for vm, d in sorted(vms.items()):
            d.setdefault("name", vm)
            owner = d.get("owner")
            d["running"] = (owner, vm) in running
            d["history"] = msgspec.to_builtins(history.read(etcd, vm))
            out.append(d)
    except (EtcdError, RecordError) as e:
        raise CliError(str(e)) from None
    finally:
        etcd.close()
    return out, {h.name for h in hosts}


def list_in_cluster(a: argparse.Namespace) -> int:
    """`pyhv vm list --cluster ENDPOINTS`: where each VM of the cluster runs."""
    vms, live = _cluster_vms(a.cluster)
    if a.as_json:
        print(json.dumps({"vms": vms, "hosts": sorted(live)}, indent=1))
        return 0
    print(f"{'NAME':20} {'HOST':12} {'STATE':8} {'DESIRED':8} {'HA':3} {'TOKEN':>6} EVENTS")
    for d in vms:
        owner = d.get("owner") or "-"
        state = "running" if d["running"] else ("host down" if owner not in live else "off")
        print(
            f"{d['name']:20} {owner:12} {state:8} {d.get('desired', '-'):8} "
            f"{'yes' if d.get('ha') else 'no':3} {d.get('token', '-'):>6} "
            + ", ".join(e["kind"] for e in d["history"][-4:])
        )
    return 0


def show_in_cluster(a: argparse.Namespace) -> int:
    """`pyhv vm show NAME --cluster ENDPOINTS`: the VM's record, owner and history."""
    import time

    vms, live = _cluster_vms(a.cluster)
    d = next((v for v in vms if v["name"] == a.name), None)
    if d is None:
        raise CliError(f"the cluster has no VM named {a.name!r} (pyhv vm list --cluster)")
    if a.as_json:
        print(json.dumps(d, indent=1))
        return 0
    owner = d.get("owner") or "-"
    print(f"name:     {d['name']}")
    print(f"host:     {owner}{'' if owner in live else ' (no live lease)'}, token {d.get('token')}")
    print(f"state:    {'running' if d['running'] else 'not running'}, desired {d.get('desired')}")
    print(f"ha:       {'yes' if d.get('ha') else 'no'}")
    print("history:")
    for e in d["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        where = f"{e['source']} -> {e['host']}" if e["source"] else e["host"]
        print(
            f"  {when} {e['kind']:9} {where} (token {e['token']})"
            + (f": {e['why']}" if e["why"] else "")
        )
    return 0
