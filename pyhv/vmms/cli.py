"""`pyhv vmms serve`, `pyhv vm ...` and `pyhv counters`: the service and its command-line
client. The commands only speak the API (pyhv.vmms.client); every value is checked by the
service, and its message is shown as is, never a traceback."""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from pyhv.vmms.client import ClientError, VmmsClient
from pyhv.vmms.paths import default_state_dir

_STATE_HELP = "state directory (default $PYHV_STATE_DIR or ~/.local/state/pyhv)"


def _fail(message: str, code: int = 1) -> NoReturn:
    err = click.ClickException(message)
    err.exit_code = code  # type: ignore[misc]
    raise err


def _client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--token", envvar="PYHV_VMMS_TOKEN", help="bearer token for --tcp")(fn)
    fn = click.option("--tcp", metavar="HOST:PORT", help="reach the VMMS over TCP")(fn)
    fn = click.option("--socket", "socket_path", type=click.Path(), help="the VMMS's Unix socket")(
        fn
    )
    fn = click.option("--state-dir", type=click.Path(file_okay=False), help=_STATE_HELP)(fn)
    return fn


def _make_client(
    state_dir: str | None, socket_path: str | None, tcp: str | None, token: str | None
) -> VmmsClient:
    state = Path(state_dir) if state_dir else default_state_dir()
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not host or not port.isdigit():
            _fail(f"--tcp {tcp!r} is not HOST:PORT (for example 127.0.0.1:8650)", 2)
        if token is None and (state / "token").is_file():
            token = (state / "token").read_text().strip()
        return VmmsClient(tcp=tcp, token=token)
    return VmmsClient(socket_path=Path(socket_path) if socket_path else state / "vmms.sock")


def _call(client: VmmsClient, method: str, path: str, body: Any = None) -> Any:
    try:
        return client.request(method, path, body)
    except ClientError as e:
        _fail(str(e))


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):g}M"


def _print_vm(vm: dict[str, Any]) -> None:
    s = vm["settings"]
    click.echo(f"{vm['name']}: {vm['state']}" + (f" ({vm['reason']})" if vm["reason"] else ""))
    if vm.get("pid"):
        click.echo(f"  worker pid {vm['pid']}, up {vm['uptime_s']} s")
    if vm.get("migration"):
        click.echo(f"  migrating: GET /api/migrations/{vm['migration']}")
    click.echo(f"  VPs {s['vps']}, startup memory {_mib(s['memory'])}")
    if s["dynamic_memory"]:
        click.echo(
            f"  Dynamic Memory: minimum {_mib(s['minimum'])}, maximum {_mib(s['maximum'])}, "
            f"buffer {s['buffer']} %, weight {s['weight']}"
        )
    else:
        click.echo("  Dynamic Memory: off")
    m = vm.get("memory")
    if m:
        click.echo(
            f"  memory: visible {_mib(m['visible'])}, assigned {_mib(m['assigned'])}, "
            f"ballooned {_mib(m['ballooned'])}"
        )
    click.echo(
        f"  image {s['image'] or '(bundled guest)'}"
        + (f", cmdline {s['cmdline']!r}" if s["cmdline"] else "")
    )


# --- pyhv vm -------------------------------------------------------------------------------


@click.group("vm")
@_client_options
@click.pass_context
def vm_group(ctx: click.Context, **kw: Any) -> None:
    """Create, start, stop and inspect VMs through the VMMS."""
    ctx.obj = _make_client(**kw)


def _dm_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    for opt in reversed(
        [
            click.option("--minimum", help="Dynamic Memory minimum (e.g. 256M)"),
            click.option("--maximum", help="Dynamic Memory maximum (e.g. 4G)"),
            click.option("--buffer", type=int, help="buffer %, 5..2000 (default 20)"),
            click.option("--weight", type=int, help="memory weight 0..100 (default 50)"),
        ]
    ):
        fn = opt(fn)
    return fn


def _given(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


@vm_group.command("create")
@click.argument("name")
@click.option("--memory", "-m", help="startup memory (default 512M)")
@click.option("--vps", type=int, help="virtual processors (default 1)")
@click.option("--dynamic/--static", "dynamic_memory", default=None, help="Dynamic Memory on/off")
@_dm_options
@click.option("--image", type=click.Path(dir_okay=False), help="guest image (default: bundled)")
@click.option("--cmdline", help="guest kernel command line")
@click.pass_obj
def vm_create(client: VmmsClient, name: str, image: str | None, **kw: Any) -> None:
    """Create VM NAME (stored; `pyhv vm start NAME` runs it)."""
    if image is not None:
        image = os.path.abspath(image)  # the service may run elsewhere in the file system
    vm = _call(client, "POST", "/api/vms", {"name": name, **_given(image=image, **kw)})
    _print_vm(vm)


@vm_group.command("start")
@click.argument("name")
@click.pass_obj
def vm_start(client: VmmsClient, name: str) -> None:
    """Start VM NAME in a worker process of its own."""
    _print_vm(_call(client, "POST", f"/api/vms/{name}/start"))


@vm_group.command("stop")
@click.argument("name")
@click.pass_obj
def vm_stop(client: VmmsClient, name: str) -> None:
    """Stop VM NAME."""
    _print_vm(_call(client, "POST", f"/api/vms/{name}/stop"))


@vm_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@click.pass_obj
def vm_list(client: VmmsClient, as_json: bool) -> None:
    """List the VMs with their state."""
    vms = _call(client, "GET", "/api/vms")["vms"]
    if as_json:
        click.echo(json.dumps(vms, indent=1))
        return
    click.echo(f"{'NAME':20} {'STATE':9} {'VPS':>3} {'MEMORY':>8} {'ASSIGNED':>9} {'DM':3} REASON")
    for vm in vms:
        s, m = vm["settings"], vm.get("memory") or {}
        click.echo(
            f"{vm['name']:20} {vm['state']:9} {s['vps']:>3} {_mib(s['memory']):>8} "
            f"{_mib(m.get('assigned')):>9} {'on' if s['dynamic_memory'] else 'off':3} "
            f"{vm['reason'].splitlines()[0] if vm['reason'] else ''}"
        )


@vm_group.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="print the API's JSON")
@click.pass_obj
def vm_show(client: VmmsClient, name: str, as_json: bool) -> None:
    """Show VM NAME's state and settings."""
    vm = _call(client, "GET", f"/api/vms/{name}")
    if as_json:
        click.echo(json.dumps(vm, indent=1))
    else:
        _print_vm(vm)


@vm_group.command("delete")
@click.argument("name")
@click.pass_obj
def vm_delete(client: VmmsClient, name: str) -> None:
    """Delete VM NAME (it must be off)."""
    _call(client, "DELETE", f"/api/vms/{name}")
    click.echo(f"deleted {name}")


@vm_group.command("memory")
@click.argument("name")
@click.option("--target", help="balloon/unballoon/hot-add towards this size (e.g. 768M)")
@click.option("--dynamic/--static", "dynamic_memory", default=None, help="Dynamic Memory on/off")
@click.option("--memory", "-m", help="startup memory (VM off only)")
@_dm_options
@click.pass_obj
def vm_memory(client: VmmsClient, name: str, target: str | None, **kw: Any) -> None:
    """Show or change VM NAME's memory. While it runs: minimum may only go down, maximum
    only up, startup is fixed; --target moves its memory now (Dynamic Memory)."""
    changes = _given(**kw)
    if changes:
        _print_vm(_call(client, "PATCH", f"/api/vms/{name}", changes))
    if target is not None:
        _call(client, "POST", f"/api/vms/{name}/memory", {"target": target})
        click.echo(f"{name}: memory target {target} sent to the worker")
    if not changes and target is None:
        st = _call(client, "GET", f"/api/vms/{name}/memory")
        sizes = " ".join(f"{k} {_mib(st.get(k))}" for k in _STATUS_SIZES)
        click.echo(
            f"{name}: {sizes}" + (" (an operation is in progress)" if st.get("busy") else "")
        )


_STATUS_SIZES = ("visible", "assigned", "ballooned", "committed", "available")


def _lazy_migration_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    from pyhv.migration.cli import _migration_options

    return _migration_options(fn)  # type: ignore[no-any-return]


@vm_group.command("migrate")
@click.argument("name")
@click.option("--to", "to", required=True, metavar="HOST:PORT", help="the destination VMMS (TCP)")
@click.option("--token", "dest_token", help="the destination VMMS's bearer token")
@click.option(
    "--token-file",
    "dest_token_file",
    type=click.Path(exists=True, dir_okay=False),
    help="file holding the destination VMMS's token (its state directory's 'token')",
)
@click.option("--timeout", default=900.0, show_default=True, help="seconds to wait for the end")
@_lazy_migration_options
@click.pass_obj
def vm_migrate(
    client: VmmsClient,
    name: str,
    to: str,
    dest_token: str | None,
    dest_token_file: str | None,
    timeout: float,
    **kw: Any,
) -> None:
    """Live-migrate running VM NAME to the VMMS at HOST:PORT, with a progress bar. On success
    it runs there and is gone here; on failure it runs on here."""
    from pyhv.migration.cli import ProgressBar, _options, _summary

    if dest_token_file:
        dest_token = Path(dest_token_file).read_text().strip()
    if not dest_token:
        _fail("give the destination VMMS's token: --token-file FILE or --token T", 2)
    rec = _call(
        client,
        "POST",
        f"/api/vms/{name}/migrate",
        {"destination": to, "token": dest_token, "options": _options(**kw)},
    )
    bar = ProgressBar()
    seen: dict[str, Any] | None = None
    deadline = time.monotonic() + timeout
    try:
        while rec["state"] not in ("done", "failed", "in-doubt"):
            if time.monotonic() > deadline:
                _fail(f"migration {rec['id']} did not end within {timeout:g} s (it goes on)")
            time.sleep(0.1)
            rec = _call(client, "GET", f"/api/migrations/{rec['id']}")
            p = rec.get("progress")
            if p and p != seen and p.get("phase") != "in-doubt":
                bar(p)
                seen = p
    finally:
        bar.finish()
    if rec["state"] == "done":
        if rec.get("result"):
            click.echo(_summary(rec["result"]))
        click.echo(f"{name} runs on {to} now" + (f" ({rec['error']})" if rec["error"] else ""))
        return
    _fail(f"migration of {name} to {to} {rec['state']}: {rec['error']}")


@vm_group.command("console")
@click.argument("name")
@click.pass_obj
def vm_console(client: VmmsClient, name: str) -> None:
    """Attach to VM NAME's serial console (Ctrl-A x detaches; the VM keeps running)."""
    from pyhv.worker.terminal import EscapeDecoder

    try:
        sock = client.console(name)
    except ClientError as e:
        _fail(str(e))
    tty = os.isatty(0)
    restore = _raw_mode(0) if tty else None
    out = sys.stdout.buffer
    if tty:
        out.write(f"[pyhv] console of {name}: Ctrl-A x detaches\r\n".encode())
        out.flush()
    decoder = EscapeDecoder()
    stdin_open = True
    try:
        while True:
            fds = [sock] + ([0] if stdin_open else [])
            ready, _, _ = select.select(fds, [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    if tty:
                        out.write(b"\r\n[pyhv] the VM ended\r\n")
                    break
                out.write(data)
                out.flush()
            if 0 in ready:
                typed = os.read(0, 4096)
                if not typed:
                    stdin_open = False  # end of input: keep showing output until the VM ends
                    continue
                to_guest, actions = decoder.feed(typed)
                if to_guest:
                    sock.sendall(to_guest)
                if "quit" in actions:
                    if tty:
                        out.write(b"\r\n[pyhv] detached\r\n")
                    break
                if "help" in actions:
                    out.write(b"\r\n[pyhv] Ctrl-A x detaches, Ctrl-A Ctrl-A sends Ctrl-A\r\n")
                    out.flush()
    finally:
        sock.close()
        out.flush()
        if restore is not None:
            restore()


def _raw_mode(fd: int) -> Callable[[], None]:
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)


# --- pyhv counters -------------------------------------------------------------------------


@click.command("counters")
@_client_options
@click.option("--once", is_flag=True, help="print once and exit")
@click.option("--interval", default=1.0, show_default=True, help="seconds between refreshes")
@click.option("--counter", "-c", "patterns", multiple=True, help="only paths containing this")
def counters_command(once: bool, interval: float, patterns: tuple[str, ...], **kw: Any) -> None:
    """The VMMS's counters by Perfmon path, refreshed like typeperf (Ctrl-C ends)."""
    if interval <= 0:
        _fail(f"--interval {interval} must be > 0 seconds", 2)
    client = _make_client(**kw)
    tty = os.isatty(1)
    try:
        while True:
            snap = _call(client, "GET", "/api/counters")["counters"]
            rows = sorted(
                (p, v) for p, v in snap.items() if not patterns or any(x in p for x in patterns)
            )
            width = max((len(p) for p, _ in rows), default=10)
            text = f"{'Counter':{width}}  {'Value':>12}\n"
            text += "".join(f"{p:{width}}  {v:>12.2f}\n" for p, v in rows)
            if not rows:
                text += "(no counters yet: start a VM)\n"
            if tty and not once:
                text = "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S\n") + text
            click.echo(text, nl=False)
            if once:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return


# --- pyhv vmms serve -----------------------------------------------------------------------


@click.group("vmms")
def vmms_group() -> None:
    """The Virtual Machine Management Service (one per host)."""


@vmms_group.command("serve")
@click.option("--state-dir", type=click.Path(file_okay=False), help=_STATE_HELP)
@click.option(
    "--socket", "socket_path", type=click.Path(), help="Unix socket (default STATE/vmms.sock)"
)
@click.option("--tcp", metavar="127.0.0.1:PORT", help="also serve TCP, with a bearer token")
@click.option("--memory-budget", help="host memory for VMs (default: all of MemTotal)")
@click.option("--host-reserve", default="512M", show_default=True, help="kept for the host")
@click.option("--time-scale", default=1.0, show_default=True, help="balancer delays x this")
@click.option(
    "--book-pacing", is_flag=True, help="adds of at most 512 MiB, 30 s apart (the book's timeline)"
)
@click.option("-v", "--verbose", is_flag=True, help="log every request")
def vmms_serve(
    state_dir: str | None,
    socket_path: str | None,
    tcp: str | None,
    memory_budget: str | None,
    host_reserve: str,
    time_scale: float,
    book_pacing: bool,
    verbose: bool,
) -> None:
    """Run the VMMS until SIGTERM or Ctrl-C; each VM runs in a worker process of its own."""
    import logging
    import signal
    import threading

    from pyhv.dynmem.balancer import BOOK_PACING, BalancerConfig, SettingsError
    from pyhv.memory.manager import MemoryManagerError
    from pyhv.vmms.pool import host_memory_bytes
    from pyhv.vmms.server import ApiServers, ServeError
    from pyhv.vmms.service import Vmms
    from pyhv.worker.config import ConfigError, parse_size

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    state = Path(state_dir) if state_dir else default_state_dir()
    address: tuple[str, int] | None = None
    if tcp:
        host, _, port = tcp.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) < 65536:
            _fail(f"--tcp {tcp!r} is not 127.0.0.1:PORT", 2)
        address = (host, int(port))
    try:
        budget = parse_size(memory_budget) if memory_budget else host_memory_bytes()
        reserve = parse_size(host_reserve)
        pacing: dict[str, Any] = dict(BOOK_PACING) if book_pacing else {}
        balancer = BalancerConfig(time_scale=time_scale, **pacing)
        vmms = Vmms(
            state,
            budget_bytes=budget,
            reserve_bytes=min(reserve, budget),
            balancer=balancer,
            # incoming migrations listen where the API does (loopback by default)
            migration={"listen_host": address[0]} if address else None,
        )
    except (ConfigError, SettingsError, MemoryManagerError) as e:
        _fail(str(e), 2)
    except OSError as e:
        _fail(f"cannot use state directory {state}: {e}")
    try:
        servers = ApiServers(
            vmms, Path(socket_path) if socket_path else state / "vmms.sock", address
        )
    except (ServeError, OSError) as e:
        _fail(f"cannot serve the API: {e}")
    for name, why in vmms.store.broken.items():
        click.echo(f"warning: {name} was not loaded: {why}", err=True)
    servers.start()
    vmms.start_balancer()
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    where = str(servers.unix.path)
    if servers.tcp_address:
        where += f" and http://{servers.tcp_address[0]}:{servers.tcp_address[1]}/ (token in {state / 'token'})"
    click.echo(
        f"VMMS serving on {where}; {len(vmms.list())} VMs, pool {budget >> 20} MiB "
        f"(reserve {min(reserve, budget) >> 20} MiB)",
        err=True,
    )
    try:
        while not done.wait(0.5):
            pass
    finally:
        click.echo("VMMS stopping: stopping the running VMs", err=True)
        servers.close()
        vmms.close()
