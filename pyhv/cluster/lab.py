"""A cluster on one machine, for tests and `pyhv experiment cluster`.

Hosts as network namespaces (iproute2): `netns_lab()` makes a bridge in the
root namespace with an address of its own (etcd listens there), and `add_host(NAME)` a network
namespace joined to it by a veth pair, with its own address; a host's VMMS runs in it
(`wrap(NAME)`: `nsenter --net`, as `ip netns exec` does but without remounting /sys, which
would hide the cgroup hierarchy the workers' jails need). `cut(NAME)` sets the host's link down (the host is cut off
from etcd and the other hosts, as a pulled cable does), `restore(NAME)` up again. Names carry a
random tag (other test runs may share the machine); everything is removed on exit, always.

`kill_host` kills a whole host the way a power cut does: every process of one VMMS host gets
SIGKILL at once, the VMMS and its workers (jailed workers run in sessions of their own, so the
process group does not find them: they are found as the VMMS's descendants, and by the state
directory on their command line)."""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


class LabError(RuntimeError):
    """The lab could not be set up: the message says what is missing."""


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise LabError(f"ip {' '.join(args)}: {r.stderr.strip()} (needs root and iproute2)")


@dataclass(frozen=True)
class LabHost:
    name: str
    netns: str
    address: str  # its IPv4 address on the bridge
    link: str  # the root namespace's end of its veth pair (cut/restore set it down/up)


class NetnsLab:
    def __init__(self) -> None:
        if shutil.which("ip") is None:
            raise LabError("iproute2 is not installed: apt-get install iproute2")
        self.tag = f"{random.randrange(16**4):04x}"
        self.bridge = f"pyhvbr{self.tag}"
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
        while True:
            net = ipaddress.ip_network(
                f"10.{random.randrange(200, 250)}.{random.randrange(1, 255)}.0/24"
            )
            if str(net.network_address)[:-1] not in used:
                break
        self.net = net
        self.address = str(net.network_address + 1)  # the bridge's (etcd listens here)
        self.hosts: dict[str, LabHost] = {}
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.address}/{net.prefixlen}", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add_host(self, name: str) -> LabHost:
        n = len(self.hosts)
        host = LabHost(
            name,
            f"pyhv-{self.tag}-{name}",
            str(self.net.network_address + 2 + n),
            f"pyhv{self.tag}h{n}",
        )
        inside = f"pyhv{self.tag}n{n}"
        ip("netns", "add", host.netns)
        self.hosts[name] = host
        ip("-n", host.netns, "link", "set", "lo", "up")
        ip("link", "add", host.link, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", host.netns)
        ip("link", "set", host.link, "master", self.bridge, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/{self.net.prefixlen}", "dev", inside)
        ip("-n", host.netns, "link", "set", inside, "up")
        return host

    def wrap(self, name: str) -> list[str]:
        """The command prefix that runs a program in host `name`'s network namespace."""
        return ["nsenter", f"--net=/run/netns/{self.hosts[name].netns}"]

    def cut(self, name: str) -> None:
        ip("link", "set", self.hosts[name].link, "down")

    def restore(self, name: str) -> None:
        ip("link", "set", self.hosts[name].link, "up")

    def close(self) -> None:
        for host in self.hosts.values():
            subprocess.run(["ip", "link", "del", host.link], capture_output=True, timeout=30)
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, timeout=30)


@contextmanager
def netns_lab() -> Iterator[NetnsLab]:
    lab = NetnsLab()
    try:
        yield lab
    finally:
        lab.close()


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue  # ended meanwhile
        ppid = int(stat.rpartition(")")[2].split()[1])
        out[int(entry)] = (ppid, cmdline.decode(errors="replace"))
    return out


def host_processes(vmms_pid: int, state_dir: Path) -> list[int]:
    """The VMMS `vmms_pid` and every process descending from it or naming `state_dir`."""
    procs = _processes()
    found = {vmms_pid}
    names = (f"{state_dir}/", f"{state_dir} ")  # its own directory, not a/ for ab/
    grew = True
    while grew:
        grew = False
        for pid, (ppid, cmdline) in procs.items():
            if pid not in found and (ppid in found or any(n in cmdline + " " for n in names)):
                found.add(pid)
                grew = True
    return sorted(found)


def kill_host(vmms_pid: int, state_dir: Path) -> list[int]:
    """SIGKILL every process of the host (the VMMS stopped first, so it starts no more while
    they are gathered); the pids killed."""
    os.kill(vmms_pid, signal.SIGSTOP)
    pids = host_processes(vmms_pid, state_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids
