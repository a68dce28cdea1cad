"""Hosts as network namespaces on this machine (iproute2): `netns_lab()` makes a bridge in the
root namespace with an address of its own (etcd listens there), and `add_host(NAME)` a network
namespace joined to it by a veth pair, with its own address; a host's VMMS runs in it
(`wrap(NAME)`: `nsenter --net`, as `ip netns exec` does but without remounting /sys, which
would hide the cgroup hierarchy the workers' jails need). `cut(NAME)` sets the host's link down (the host is cut off
from etcd and the other hosts, as a pulled cable does), `restore(NAME)` up again. Names carry a
random tag (other test runs may share the machine); everything is removed on exit, always."""

from __future__ import annotations

import ipaddress
import random
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass


def ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@dataclass(frozen=True)
class LabHost:
    name: str
    netns: str
    address: str  # its IPv4 address on the bridge
    link: str  # the root namespace's end of its veth pair (cut/restore set it down/up)


class NetnsLab:
    def __init__(self) -> None:
        if shutil.which("ip") is None:
            raise AssertionError("iproute2 is not installed: apt-get install iproute2")
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
