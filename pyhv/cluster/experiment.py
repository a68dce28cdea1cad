"""`pyhv experiment cluster`: three hosts on this machine (network namespaces on a bridge,
pyhv.cluster.lab), each a real VMMS serving mutual TLS with a certificate from the cluster's CA,
one etcd on the bridge, six highly available Dynamic Memory VMs placed by the cluster (three in
an affinity group, on one host). The grouped VMs commit memory (`testlimit`) until their host is
short; the standing leader's cluster balancer moves a VM away by live migration; then every
process of that host is killed and the leader restarts its VMs on the others. Sampled every
0.5 s: each host's record (its VMs' assigned memory and demand) and which host runs each VM
(through each host's Unix socket; a live migration's source, which the VMMS lists with its
migration, is not counted: it is paused from the switchover until it is removed).
Prints a timeline, writes PREFIX.csv and PREFIX.png, and returns the issue's summary."""

from __future__ import annotations

import csv
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pyhv.cluster import history, ownership, pki, provision
from pyhv.cluster.etcd import Etcd, EtcdError
from pyhv.cluster.lab import NetnsLab, kill_host
from pyhv.cluster.records import HOSTS, host_key
from pyhv.cluster.snapshot import read_hosts
from pyhv.vmms.client import ClientError, ClientTls, VmmsClient

MIB = 1 << 20
HOST_NAMES = ("a", "b", "c")


class ClusterExperimentError(RuntimeError):
    """A step did not happen in time: the message says which, and where the logs are."""


@dataclass
class Run:
    tmp: Path
    t0: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    twice: set[str] = field(default_factory=set)

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 2)

    def event(self, text: str) -> None:
        self.events.append((self.now(), text))
        print(f"{self.now():7.1f} s  {text}", flush=True)


def _wait(what: str, f: Any, timeout: float, run: Run, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = f()
        except (EtcdError, ClientError, OSError):
            got = None
        if got:
            return got
        time.sleep(interval)
    raise ClusterExperimentError(f"{what}: not within {timeout:.0f} s (logs in {run.tmp})")


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _etcd(run: Run, address: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("etcd") or "/usr/bin/etcd"
    if not os.path.exists(binary):
        raise ClusterExperimentError("etcd is not installed: apt-get install etcd-server")
    port, peer = _free_port(address), _free_port("127.0.0.1")
    endpoint = f"http://{address}:{port}"
    log = open(run.tmp / "etcd.log", "wb")
    proc = subprocess.Popen(
        [binary, "--name=lab", f"--data-dir={run.tmp / 'etcd'}",
         f"--listen-client-urls={endpoint}", f"--advertise-client-urls={endpoint}",
         f"--listen-peer-urls=http://127.0.0.1:{peer}",
         f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
         f"--initial-cluster=lab=http://127.0.0.1:{peer}", "--log-level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip

    def healthy() -> bool:
        return httpx.get(endpoint + "/health", timeout=1).status_code == 200

    _wait("etcd answering", healthy, 30, run)
    return proc, endpoint


def run_cluster_experiment(out: Path, lease_ttl: int = 5, commit_mib: int = 380) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="pyhv-cluster-"))
    run = Run(tmp)
    lab = NetnsLab()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    etcd_proc = None
    stop = threading.Event()
    try:
        ca = tmp / "ca"
        pki.init(ca)
        for name in HOST_NAMES:
            h = lab.add_host(name)
            pki.add_host(ca, name, (h.address,))
        pki.add_host(ca, "admin")
        tls = ClientTls(ca / "ca.pem", ca / "admin.pem", ca / "admin.key")
        etcd_proc, endpoint = _etcd(run, lab.address)
        etcd = Etcd(endpoint)
        tokens_path = tmp / "tokens"
        for name in HOST_NAMES:
            state = tmp / name
            procs[name] = subprocess.Popen(
                [*lab.wrap(name), sys.executable, "-m", "pyhv.cli", "vmms", "serve",
                 "--state-dir", str(state), "--tcp", f"{lab.hosts[name].address}:0",
                 "--memory-budget", "1280M", "--host-reserve", "256M", "--time-scale", "0.1",
                 "--tls-cert", str(ca / f"{name}.pem"), "--tls-key", str(ca / f"{name}.key"),
                 "--tls-client-ca", str(ca / "ca.pem"), "--cluster", endpoint, "--host", name,
                 "--lease-ttl", str(lease_ttl), "--balance-every", "3",
                 "--cluster-tokens", str(tokens_path), "--stop-vms-on-exit"],
                stdout=open(tmp / f"{name}.log", "wb"), stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait("the three hosts joining", lambda: len(etcd.get_prefix(HOSTS)[0]) == 3, 90, run)
        fd = os.open(tokens_path, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            for name in HOST_NAMES:
                t = [
                    (tmp / name / x).read_text().strip()
                    for x in ("cluster-token", "migration-token")
                ]
                f.write(f"{name} {t[0]} {t[1]}\n")
        tokens = provision.read_tokens(tokens_path)
        run.event("3 hosts joined (network namespaces, mutual TLS), etcd on the bridge")
        vms = [("hot1", ("hot",), ()), ("hot2", ("hot",), ()), ("hot3", ("hot",), ()),
               ("vm4", (), ("spread",)), ("vm5", (), ("spread",)), ("vm6", (), ("spread",))]  # fmt: skip
        where: dict[str, str] = {}
        for vm, aff, anti in vms:
            config = {"name": vm, "memory": 128 * MIB, "dynamic_memory": True,
                      "minimum": 128 * MIB, "maximum": 512 * MIB}  # fmt: skip
            host, _ = provision.create(etcd, config, tokens, aff, anti, True, tls)
            where[vm] = host
            hosts = {h.name: h for h in read_hosts(etcd)}
            provision.host_client(hosts[host], tokens, tls).request("POST", f"/api/vms/{vm}/start")
            _wait(f"host {host} publishing {vm}", lambda h=host, v=vm: any(
                x.name == v for x in _record(etcd, h)), 30, run)  # fmt: skip
        run.event("6 HA VMs placed and started: " + ", ".join(f"{v}@{h}" for v, h in where.items()))
        hot_host = where["hot1"]
        sampler = threading.Thread(target=_sample, args=(run, etcd, tmp, stop), daemon=True)
        sampler.start()
        for vm in ("hot1", "hot2", "hot3"):
            _wait(f"{vm}'s guest reporting its demand", lambda v=vm: _demand(etcd, hot_host, v),
                  90, run)  # fmt: skip
        for vm in ("hot1", "hot2", "hot3"):
            _type(tmp / hot_host, vm, f"testlimit -m {commit_mib} -c 1")
        run.event(f"hot1-3 on host {hot_host} commit {commit_mib} MiB each (testlimit)")
        _wait(f"host {hot_host} short", lambda: _short(etcd, hot_host), 120, run)
        run.event(f"host {hot_host} is short: its VMs' targets exceed its memory")
        moved = _wait("the cluster balancer moving a VM", lambda: _moved(etcd), 180, run, 0.5)
        run.event(f"cluster balancer moved {moved[0]} from {moved[1]} to {moved[2]} (live)")
        _wait(f"host {hot_host} no longer short", lambda: not _short(etcd, hot_host), 120, run)
        run.event(f"host {hot_host}'s pressure fell")
        victims = [
            vm for vm, _, _ in vms if (o := ownership.owner(etcd, vm)) and o.host == hot_host
        ]
        kill_at = time.monotonic()
        killed = kill_host(procs[hot_host].pid, tmp / hot_host)
        run.event(
            f"host {hot_host} killed: {len(killed)} processes (its VMs: {', '.join(victims)})"
        )
        others = [h for h in HOST_NAMES if h != hot_host]
        first: dict[str, float] = {}
        for vm in victims:
            host, at = _wait(f"{vm} running elsewhere", lambda v=vm: _first_byte(tmp, others, v),
                             lease_ttl + 90, run, 0.05)  # fmt: skip
            first[vm] = at - kill_at
            run.event(f"{vm} restarted on host {host}: first serial byte {first[vm]:.2f} s "
                      "after the kill")  # fmt: skip
        time.sleep(2)  # a few more samples after the restarts
        stop.set()
        sampler.join(5)
        moves = sum(1 for vm, _, _ in vms for e in history.read(etcd, vm) if e.kind == "moved")
        under = _vm_seconds_under_pressure(run.rows)
        etcd.close()
    finally:
        stop.set()
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        for p in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if etcd_proc is not None:
            etcd_proc.terminate()
            etcd_proc.wait(10)
        lab.close()
    if out.parent != Path(""):
        out.parent.mkdir(parents=True, exist_ok=True)
    _write_csv(run, out.with_suffix(".csv"))
    _write_png(run, out.with_suffix(".png"), hot_host)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    shutil.rmtree(tmp, ignore_errors=True)  # the hosts' state and logs (kept when a step failed)
    return {
        "hosts": len(HOST_NAMES),
        "migrations": moves,
        "ha_restart_s": round(max(first.values()), 2) if first else None,
        "vms_running_twice": len(run.twice),
        "vm_seconds_under_pressure": round(under, 1),
    }


def _record(etcd: Etcd, host: str) -> list[Any]:
    kv = etcd.get(host_key(host))
    if kv is None:
        return []
    from pyhv.cluster.records import HostRecord, decode

    return list(decode(kv.key, kv.value, HostRecord).vms)


def _demand(etcd: Etcd, host: str, vm: str) -> bool:
    return any(v.name == vm and v.demand is not None for v in _record(etcd, host))


def _short(etcd: Etcd, host: str) -> bool:
    hosts = {h.name: h for h in read_hosts(etcd)}
    h = hosts.get(host)
    return h is not None and sum(v.target for v in h.vms) > (h.total - h.reserve) * 1.02


def _moved(etcd: Etcd) -> tuple[str, str, str] | None:
    for vm in ("hot1", "hot2", "hot3", "vm4", "vm5", "vm6"):
        for e in history.read(etcd, vm):
            if e.kind == "moved":
                return vm, e.source, e.host
    return None


def _type(state: Path, vm: str, command: str) -> None:
    with VmmsClient(socket_path=state / "vmms.sock", timeout=30).console(vm) as sock:
        sock.sendall(command.encode() + b"\r")
        time.sleep(0.2)


def _first_byte(tmp: Path, hosts: list[str], vm: str) -> tuple[str, float] | None:
    for h in hosts:
        c = VmmsClient(socket_path=tmp / h / "vmms.sock", timeout=10)
        try:
            if c.request("GET", f"/api/vms/{vm}")["state"] != "running":
                continue
            with c.console(vm) as sock:
                if sock.recv(1):
                    return h, time.monotonic()
        except (ClientError, OSError):
            continue
    return None


def _sample(run: Run, etcd: Etcd, tmp: Path, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        t = run.now()
        try:
            hosts = read_hosts(etcd)
        except EtcdError:
            continue
        for h in hosts:
            run.rows.append({"t": t, "host": h.name, "vm": "", "assigned_mib": 0,
                             "demand_mib": "", "memory_mib": (h.total - h.reserve) // MIB,
                             "short": int(h.pressure.short)})  # fmt: skip
            for v in h.vms:
                run.rows.append({"t": t, "host": h.name, "vm": v.name,
                                 "assigned_mib": v.assigned // MIB,
                                 "demand_mib": "" if v.demand is None else v.demand // MIB,
                                 "memory_mib": "", "short": ""})  # fmt: skip
        running: dict[str, list[str]] = {}
        for name in HOST_NAMES:
            sock = tmp / name / "vmms.sock"
            try:
                listed = VmmsClient(socket_path=sock, timeout=2).request("GET", "/api/vms")["vms"]
            except (ClientError, OSError):
                continue
            for vm in listed:
                # A live migration's source is paused from the switchover until it is removed:
                # the guest runs at the destination alone (pyhv.migration).
                if vm["state"] == "running" and not vm.get("migration"):
                    running.setdefault(vm["name"], []).append(name)
        for vm, on in running.items():
            if len(on) > 1 and vm not in run.twice:
                run.twice.add(vm)
                run.event(f"{vm} seen running on {' and '.join(on)}")


def _vm_seconds_under_pressure(rows: list[dict[str, Any]]) -> float:
    times = sorted({r["t"] for r in rows})
    step = 0.5 if len(times) < 2 else (times[-1] - times[0]) / (len(times) - 1)
    return step * sum(
        1 for r in rows if r["vm"] and r["demand_mib"] != "" and r["demand_mib"] > r["assigned_mib"]
    )


def _write_csv(run: Run, path: Path) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(
            f, ["t", "host", "vm", "assigned_mib", "demand_mib", "memory_mib", "short"]
        )
        w.writeheader()
        w.writerows(run.rows)
        for t, text in run.events:
            w.writerow({"t": t, "host": "", "vm": f"event: {text}"})


def _write_png(run: Run, path: Path, hot_host: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    per_host: dict[str, dict[float, int]] = {}
    per_vm: dict[str, list[tuple[float, int]]] = {}
    for r in run.rows:
        if r["vm"]:
            per_host.setdefault(r["host"], {}).setdefault(r["t"], 0)
            per_host[r["host"]][r["t"]] += r["assigned_mib"]
            per_vm.setdefault(r["vm"], []).append((r["t"], r["assigned_mib"]))
    for host, series in sorted(per_host.items()):
        ts = sorted(series)
        top.plot(ts, [series[t] for t in ts], label=f"host {host}")
    top.set_ylabel("assigned to VMs (MiB)")
    top.legend(loc="upper left")
    for vm, pts in sorted(per_vm.items()):
        bottom.plot([p[0] for p in pts], [p[1] for p in pts], "-", drawstyle="steps-post",
                    label=vm)  # fmt: skip
    bottom.set_ylabel("assigned per VM (MiB)")
    bottom.set_xlabel("seconds")
    bottom.legend(loc="upper left", ncol=3, fontsize=8)
    for t, text in run.events:
        if "moved" in text or "killed" in text or "restarted" in text:
            for ax in (top, bottom):
                ax.axvline(t, color="grey", lw=0.8, ls="--")
            top.annotate(text.split(":")[0][:28], (t, top.get_ylim()[1]), fontsize=7,
                         rotation=90, va="top")  # fmt: skip
    top.set_title(f"pyhv experiment cluster: host {hot_host} short, a VM moved, then killed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
