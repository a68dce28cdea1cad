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
    """Where the VMMS is. With `again` (a subcommand's copy) an option left out keeps the value
    given before the subcommand: `pyhv vm --state-dir D list` and `pyhv vm list --state-dir D`."""
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
            "--token",
            help="bearer token for --tcp (default $PYHV_VMMS_TOKEN)",
            **(keep or {"default": os.environ.get("PYHV_VMMS_TOKEN")}),
        )


def client(a: argparse.Namespace) -> VmmsClient:
    from pyhv.vmms.client import VmmsClient
    from pyhv.vmms.paths import default_state_dir

    state = Path(a.state_dir) if a.state_dir else default_state_dir()
    if a.tcp:
        token = a.token
        if token is None and (state / "token").is_file():
            token = (state / "token").read_text().strip()
        return VmmsClient(tcp=f"{a.tcp[0]}:{a.tcp[1]}", token=token)
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
    s.add_argument("--tcp", metavar="127.0.0.1:PORT", help="also serve TCP, with a bearer token")
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
        "--stop-vms-on-exit",
        action="store_true",
        help="stop every running VM when the VMMS stops (SIGTERM, Ctrl-C). Default: as "
        "Hyper-V's VMMS service stop, the VMs run on in their workers and the next `pyhv vmms "
        "serve` on this state directory adopts them",
    )
    s.add_argument("-v", "--verbose", action="store_true", help="log every request")
    s.set_defaults(func=serve_command)


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


def serve_command(a: argparse.Namespace) -> int:
    import logging
    import signal
    import threading

    from pyhv.dynmem.balancer import BOOK_PACING, BalancerConfig, SettingsError
    from pyhv.memory.manager import MemoryManagerError
    from pyhv.vmms.paths import default_state_dir
    from pyhv.vmms.pool import host_memory_bytes
    from pyhv.vmms.server import ApiServers, ServeError
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
            raise CliError(f"--tcp {a.tcp!r} is not 127.0.0.1:PORT", 2)
        address = (host, int(port))
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
            migration={"listen_host": address[0]} if address else None,
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
            vmms, Path(a.socket_path) if a.socket_path else state / "vmms.sock", address
        )
    except (ServeError, OSError) as e:
        raise CliError(f"cannot serve the API: {e}") from None
    for name, why in vmms.store.broken.items():
        print(f"warning: {name} was not loaded: {why}", file=sys.stderr)
    servers.start()
    vmms.start_balancer()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    where = str(servers.unix.path)
    if servers.tcp_address:
        where += f" and http://{servers.tcp_address[0]}:{servers.tcp_address[1]}/ (token in {state / 'token'})"
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
        servers.close()
        vmms.close(stop_vms=a.stop_vms_on_exit)
    return 0
