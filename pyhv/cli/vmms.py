"""`pyhv vmms serve`, and how the client commands (`pyhv vm`, `pyhv counters`) reach a VMMS:
its Unix socket in the state directory, or TCP with a bearer token."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError

if TYPE_CHECKING:
    from pyhv.vmms.client import VmmsClient

_STATE_HELP = "state directory (default $PYHV_STATE_DIR or ~/.local/state/pyhv)"


def add_client_options(
    p: argparse.ArgumentParser, *, again: bool = False, token: bool = True
) -> None:
    """Where the VMMS is, and how to prove who we are. With `again` (a subcommand's copy) an
    option left out keeps the value given before the subcommand: `pyhv vm --state-dir D list`
    and `pyhv vm list --state-dir D`. Secrets come from files or the environment, never from
    the command line."""
    keep: dict[str, Any] = {"default": argparse.SUPPRESS} if again else {}
    p.add_argument("--state-dir", metavar="DIR", help=_STATE_HELP, **keep)
    p.add_argument(
        "--socket", dest="socket_path", metavar="PATH", help="the VMMS's Unix socket", **keep
    )
    p.add_argument(
        "--tcp", type=types.address, metavar="HOST:PORT", help="reach the VMMS over TCP", **keep
    )
    if token:
        p.add_argument(
            "--token-file",
            dest="vmms_token_file",
            metavar="FILE",
            help="file holding the bearer token for --tcp (default $PYHV_VMMS_TOKEN, or the "
            "state directory's 'token')",
            **keep,
        )
        types.refuse_secret(p, "--token", "--token-file FILE or $PYHV_VMMS_TOKEN")
    for name, env, what in _TLS_OPTIONS:
        p.add_argument(
            f"--tls-{name}",
            dest=f"tls_{name}",
            metavar="FILE",
            help=f"{what} (default ${env})",
            **(keep or {"default": None}),
        )


_TLS_OPTIONS = (
    ("ca", "PYHV_TLS_CA", "TLS to the VMMS (https): the CA its certificate chains to"),
    ("cert", "PYHV_TLS_CERT", "this client's TLS certificate (a VMMS that asks for one)"),
    ("key", "PYHV_TLS_KEY", "the key of --tls-cert"),
)


def client_tls(a: argparse.Namespace) -> Any:
    """The client's TLS settings from --tls-ca/--tls-cert/--tls-key or $PYHV_TLS_*; None
    without a CA (plain HTTP)."""
    from pyhv.vmms.client import ClientTls

    given = {
        name: getattr(a, f"tls_{name}", None) or os.environ.get(env) or None
        for name, env, _ in _TLS_OPTIONS
    }
    if given["ca"] is None:
        if given["cert"] or given["key"]:
            raise CliError("--tls-cert/--tls-key need --tls-ca (the VMMS's CA) too", 2)
        return None
    if bool(given["cert"]) != bool(given["key"]):
        raise CliError("give --tls-cert and --tls-key together", 2)
    return ClientTls(
        Path(given["ca"]),
        Path(given["cert"]) if given["cert"] else None,
        Path(given["key"]) if given["key"] else None,
    )


def client(a: argparse.Namespace) -> VmmsClient:
    from pyhv.vmms.client import ClientError, VmmsClient
    from pyhv.vmms.paths import default_state_dir

    state = Path(a.state_dir) if a.state_dir else default_state_dir()
    if a.tcp:
        token_file = getattr(a, "vmms_token_file", None)
        if token_file:
            token: str | None = types.text_file_or_error(token_file).strip()
        else:
            token = os.environ.get("PYHV_VMMS_TOKEN", "").strip() or None
            if token is None and (state / "token").is_file():
                token = (state / "token").read_text().strip()
        try:
            return VmmsClient(tcp=f"{a.tcp[0]}:{a.tcp[1]}", token=token, tls=client_tls(a))
        except ClientError as e:
            raise CliError(str(e), 2) from None
    return VmmsClient(socket_path=Path(a.socket_path) if a.socket_path else state / "vmms.sock")


def call(c: VmmsClient, method: str, path: str, body: Any = None) -> Any:
    """One API request; the service's refusal becomes the command's error, as it worded it."""
    from pyhv.vmms.client import ClientError

    try:
        return c.request(method, path, body)
    except ClientError as e:
        raise CliError(str(e)) from None


def register(sub: Any) -> None:
    p = sub.add_parser(
        "vmms",
        help="the Virtual Machine Management Service (one per host)",
        description="The Virtual Machine Management Service (one per host).",
    )
    cmds = p.add_subparsers(dest="vmms_command", metavar="COMMAND", required=True)
    s = cmds.add_parser(
        "serve",
        help="run the VMMS",
        description="Run the VMMS until SIGTERM or Ctrl-C; each VM runs in a worker process of its own.",
    )
    s.add_argument("--state-dir", metavar="DIR", help=_STATE_HELP)
    s.add_argument(
        "--socket", dest="socket_path", metavar="PATH", help="Unix socket (default STATE/vmms.sock)"
    )
    s.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        help="also serve TCP, with bearer tokens (an address beyond loopback needs TLS)",
    )
    s.add_argument("--tls-cert", metavar="FILE", help="TCP over TLS: this VMMS's certificate")
    s.add_argument("--tls-key", metavar="FILE", help="the key of --tls-cert")
    s.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="ask every TCP client for a certificate from this CA (mutual TLS); also the CA "
        "this VMMS trusts for its migration peers",
    )
    s.add_argument(
        "--migration-token-file",
        metavar="FILE",
        help="the migration token (it can only bring a VM in) from FILE (default: "
        "STATE/migration-token, made on first use)",
    )
    s.add_argument(
        "--max-connections",
        type=int,
        default=1024,
        metavar="N",
        help="open API connections per socket at most; more are closed at once (default 1024)",
    )
    s.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="seconds a request's head may take; slower clients are dropped (default 10)",
    )
    s.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a request's body may take once its head came (default 30)",
    )
    types.refuse_secret(s, "--token", "the state directory's 'token' file")
    s.add_argument(
        "--memory-budget",
        type=types.size,
        metavar="SIZE",
        help="host memory for VMs (default: all of MemTotal)",
    )
    s.add_argument(
        "--host-reserve",
        type=types.size,
        default="512M",
        metavar="SIZE",
        help="kept for the host (default 512M)",
    )
    s.add_argument(
        "--time-scale", type=float, default=1.0, help="balancer delays x this (default 1)"
    )
    s.add_argument(
        "--book-pacing",
        action="store_true",
        help="adds of at most 512 MiB, 30 s apart (the book's timeline)",
    )
    s.add_argument(
        "--images",
        metavar="DIR",
        help="where VMs' image names are looked up (default STATE/images); pyhv-guest is the "
        "bundled guest",
    )
    s.add_argument(
        "--no-jail",
        action="store_true",
        help="run workers without a jail or memory cgroup (development only; workers are jailed "
        "when the VMMS runs as root)",
    )
    s.add_argument(
        "--jail-uid-base",
        type=int,
        default=100000,
        metavar="UID",
        help="first uid/gid of the workers' range (default 100000; one per VM)",
    )
    s.add_argument(
        "--worker-overhead",
        type=types.size,
        default="96M",
        metavar="SIZE",
        help="a worker's memory beyond its guest's: its cgroup limit is assigned + this "
        "(default 96M)",
    )
    s.add_argument(
        "--cluster",
        metavar="ENDPOINTS",
        help="join the cluster whose etcd is at ENDPOINTS (http://HOST:PORT[,...]; docs/cluster.md)",
    )
    s.add_argument(
        "--host", metavar="NAME", help="this host's name in the cluster (default: hostname)"
    )
    s.add_argument(
        "--lease-ttl",
        type=int,
        default=5,
        metavar="S",
        help="the host's lease in the cluster, seconds (default 5): a host cut off from etcd "
        "stops its VMs before it ends",
    )
    s.add_argument(
        "--balance-every",
        type=float,
        default=0.0,
        metavar="S",
        help="with --cluster: campaign for the cluster balancer's leadership and, as leader, "
        "plan and carry out live migrations every S seconds (default 0: never)",
    )
    s.add_argument(
        "--balance-policy",
        default="cluster",
        metavar="P",
        help="the cluster balancer's policy: cluster (default), host-only, a .py file or "
        "module[:attribute]",
    )
    s.add_argument(
        "--cluster-tokens",
        type=Path,
        metavar="FILE",
        help="the hosts' API tokens for the leader's moves, lines `HOST CLUSTER_TOKEN "
        "[MIGRATION_TOKEN]` "
        "(default $PYHV_CLUSTER_TOKENS)",
    )
    s.add_argument(
        "--stop-vms-on-exit",
        action="store_true",
        help="stop every running VM when the VMMS stops (SIGTERM, Ctrl-C). Default: as "
        "Hyper-V's VMMS service stop, the VMs run on in their workers and the next `pyhv vmms "
        "serve` on this state directory adopts them",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="log every request")
    s.set_defaults(func=serve_command)
    c = cmds.add_parser(
        "chart",
        help="print a one-time URL of the live chart page",
        description="Print a URL of the VMMS's live chart page (its TCP API) that a browser can "
        "open once, within a minute: it trades the one-time code in it for a short-lived "
        "cookie (HttpOnly, SameSite=Strict). No token appears in the URL.",
    )
    add_client_options(c)
    c.set_defaults(func=chart_command)


def chart_command(a: argparse.Namespace) -> int:
    print(call(client(a), "POST", "/api/chart-codes")["url"])
    return 0


def _jail_policy(a: argparse.Namespace, migrating: bool) -> Any:
    """Workers are jailed when the VMMS runs as root, unless --no-jail (the VMMS says so
    loudly in its log)."""
    import logging

    from pyhv.vmms.jailing import JailPolicy

    if a.no_jail:
        return None
    if os.geteuid() != 0:
        logging.getLogger("pyhv.vmms").warning(
            "not root: workers cannot be jailed (own uid, namespaces, memory cgroup)"
        )
        return None
    if a.jail_uid_base < 1000:
        raise CliError(
            f"--jail-uid-base {a.jail_uid_base}: pick 1000 or more (not a system uid)", 2
        )
    return JailPolicy(uid_base=a.jail_uid_base, overhead_bytes=a.worker_overhead, network=migrating)


def _join_cluster(
    a: argparse.Namespace, vmms: Any, tcp: tuple[str, int] | None, peer_tls: Any = None
) -> Any:
    """With --cluster: the host joins (pyhv.cluster.membership), or the command fails."""
    if not a.cluster:
        if a.host:
            raise CliError("--host names this host in a cluster: give --cluster ENDPOINTS too", 2)
        return None
    import socket

    from pyhv.cluster.membership import JoinError, join
    from pyhv.cluster.pki import PkiError, fingerprint

    if a.lease_ttl < 3:
        raise CliError(f"--lease-ttl {a.lease_ttl}: give 3 seconds or more", 2)
    host = a.host or socket.gethostname()
    try:
        print_ = fingerprint(Path(a.tls_cert)) if a.tls_cert else ""
    except PkiError as e:
        raise CliError(str(e), 2) from None
    try:
        agent = join(
            a.cluster,
            host,
            vmms,
            api=f"{tcp[0]}:{tcp[1]}" if tcp else "",
            migration=tcp[0] if tcp else "127.0.0.1",
            ttl_s=a.lease_ttl,
            last_decision=lambda: vmms.balancer.last_decision,
            fingerprint=print_,
        )
    except JoinError as e:
        raise CliError(str(e)) from None
    print(f"host {host} joined the cluster at {a.cluster}", file=sys.stderr, flush=True)
    if a.balance_every > 0:
        _stand_for_leader(a, agent, vmms, peer_tls)
    return agent


def _stand_for_leader(a: argparse.Namespace, agent: Any, vmms: Any, tls: Any) -> None:
    """With --balance-every: the standing cluster balancer (pyhv.cluster.leader)."""
    from pyhv.cluster.leader import StandingLeader
    from pyhv.cluster.policies import load_policy
    from pyhv.cluster.policy import PolicyError
    from pyhv.cluster.provision import read_tokens

    try:
        policy = load_policy(a.balance_policy)
    except PolicyError as e:
        agent.close()
        raise CliError(str(e), 2) from None

    def tokens() -> dict[str, Any]:
        return read_tokens(a.cluster_tokens)

    leader = StandingLeader(
        agent.etcd, agent.name, lambda: agent.lease, policy, tokens, a.balance_every,
        registry=vmms.registry, tls=tls,
    )  # fmt: skip
    agent.on_close.append(leader.close)
    leader.start()


def _serve_tls(a: argparse.Namespace, address: tuple[str, int] | None) -> tuple[Any, Any]:
    """The TCP API's TLS (ServerTls) and what this VMMS speaks to its migration peers
    (ClientTls: its own certificate, and the client CA as the peers' CA)."""
    from pyhv.vmms.client import ClientTls
    from pyhv.vmms.server import ServerTls

    if not (a.tls_cert or a.tls_key or a.tls_client_ca):
        return None, None
    if not (a.tls_cert and a.tls_key):
        raise CliError("TLS needs both --tls-cert and --tls-key", 2)
    if address is None:
        raise CliError("--tls-* are for the TCP API: give --tcp HOST:PORT too", 2)
    ca = Path(a.tls_client_ca) if a.tls_client_ca else None
    server = ServerTls(Path(a.tls_cert), Path(a.tls_key), ca)
    peer = ClientTls(ca, Path(a.tls_cert), Path(a.tls_key)) if ca is not None else None
    return server, peer


def serve_command(a: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from pyhv.dynmem.balancer import BOOK_PACING, BalancerConfig, SettingsError
    from pyhv.memory.manager import MemoryManagerError
    from pyhv.vmms.paths import default_state_dir
    from pyhv.vmms.pool import host_memory_bytes
    from pyhv.vmms.server import ApiServers, Limits, ServeError, raise_open_files_limit
    from pyhv.vmms.service import Vmms
    from pyhv.worker.config import ConfigError
    from pyhv.worker.jail import JailError

    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    state = Path(a.state_dir) if a.state_dir else default_state_dir()
    address: tuple[str, int] | None = None
    if a.tcp:
        host, _, port = a.tcp.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise CliError(f"--tcp {a.tcp!r} is not HOST:PORT (e.g. 127.0.0.1:8650)", 2)
        address = (host.strip("[]"), int(port))
    tls, peer_tls = _serve_tls(a, address)
    if a.max_connections < 16:
        raise CliError(f"--max-connections {a.max_connections}: give 16 or more", 2)
    for option, value in (
        ("--header-timeout", a.header_timeout),
        ("--body-timeout", a.body_timeout),
    ):
        if not value > 0:
            raise CliError(f"{option} {value:g}: give seconds > 0", 2)
    # Each connection is a file descriptor: room for both sockets' caps, VMs and files.
    open_files = raise_open_files_limit()
    max_connections = min(a.max_connections, max(16, (open_files - 512) // 2))
    if max_connections < a.max_connections:
        logging.getLogger("pyhv.vmms").warning(
            "--max-connections %d lowered to %d: RLIMIT_NOFILE is %d (raise it with ulimit -n)",
            a.max_connections,
            max_connections,
            open_files,
        )
    if not a.verbose:
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        budget = a.memory_budget if a.memory_budget is not None else host_memory_bytes()
        reserve = a.host_reserve
        pacing: dict[str, Any] = dict(BOOK_PACING) if a.book_pacing else {}
        balancer = BalancerConfig(time_scale=a.time_scale, **pacing)
        vmms = Vmms(
            state,
            budget_bytes=budget,
            reserve_bytes=min(reserve, budget),
            balancer=balancer,
            # incoming migrations listen where the API does (loopback by default)
            migration=(
                {"listen_host": address[0], "peer_tls": peer_tls}
                if address
                else {"peer_tls": peer_tls}
            ),
            jail=_jail_policy(a, migrating=address is not None),
            images_dir=Path(a.images) if a.images else None,
        )
    except (ConfigError, SettingsError, MemoryManagerError) as e:
        raise CliError(str(e), 2) from None
    except JailError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot use state directory {state}: {e}") from None
    try:
        servers = ApiServers(
            vmms,
            Path(a.socket_path) if a.socket_path else state / "vmms.sock",
            address,
            tls=tls,
            migration_token_file=Path(a.migration_token_file) if a.migration_token_file else None,
            limits=Limits(
                max_connections=max_connections,
                head_timeout=a.header_timeout,
                body_timeout=a.body_timeout,
            ),
            verbose=a.verbose,
        )
    except (ServeError, OSError) as e:
        vmms.close()
        raise CliError(f"cannot serve the API: {e}") from None
    for name, why in vmms.store.broken.items():
        print(f"warning: {name} was not loaded: {why}", file=sys.stderr)
    try:
        servers.start()
    except ServeError as e:
        servers.close()
        vmms.close()
        raise CliError(f"cannot serve the API: {e}") from None
    vmms.start_balancer()
    try:
        agent = _join_cluster(a, vmms, servers.tcp_address, peer_tls)
    except CliError:
        servers.close()
        vmms.close()
        raise
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    where = str(servers.unix.path)
    if servers.tcp_url:
        where += (
            f" and {servers.tcp_url}/ (admin token in {state / 'token'}, migration token in "
            f"{a.migration_token_file or state / 'migration-token'})"
        )
    print(
        f"VMMS serving on {where}; {len(vmms.list())} VMs, pool {budget >> 20} MiB "
        f"(reserve {min(reserve, budget) >> 20} MiB)",
        file=sys.stderr,
        flush=True,
    )
    try:
        while not done.wait(0.5):
            pass
    finally:
        print(
            "VMMS stopping: "
            + (
                "stopping the running VMs"
                if a.stop_vms_on_exit
                else "the running VMs run on (the next VMMS on this state directory adopts them)"
            ),
            file=sys.stderr,
            flush=True,
        )
        if agent is not None:
            agent.close()
        servers.close()
        vmms.close(stop_vms=a.stop_vms_on_exit)
    return 0
