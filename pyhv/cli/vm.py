"""`pyhv vm ...`: the way to act on a VM: create, start, stop, list, show, delete, its memory,
its console and live migration, all through the VMMS's API (pyhv.vmms.client). Every value is
checked by the service and its message is shown as it worded it, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError
from pyhv.cli.migrate import add_migration_options, migration_options
from pyhv.cli.trace import add_vm_trace
from pyhv.cli.vmms import add_client_options, call, client
from pyhv.sizes import format_size

_STATUS_SIZES = ("visible", "assigned", "ballooned", "committed", "available")


def _size(n: int | None) -> str:
    return "-" if n is None else format_size(n)


def _demand(n: int | None) -> str:
    """Memory Demand in whole MiB, as Hyper-V Manager shows it (MB)."""
    return "-" if n is None else format_size((n + (1 << 19)) >> 20 << 20)


def _print_vm(vm: dict[str, Any]) -> None:
    s = vm["settings"]
    print(f"{vm['name']}: {vm['state']}" + (f" ({vm['reason']})" if vm["reason"] else ""))
    if vm.get("pid"):
        jail = f"jailed as uid {vm['jail_uid']}" if vm.get("jail_uid") else "not jailed"
        print(f"  worker pid {vm['pid']} ({jail}), up {vm['uptime_s']} s")
    if vm.get("migration"):
        print(f"  migrating: GET /api/migrations/{vm['migration']}")
    print(f"  VPs {s['vps']}, startup memory {_size(s['memory'])}")
    if s["dynamic_memory"]:
        print(
            f"  Dynamic Memory: minimum {_size(s['minimum'])}, maximum {_size(s['maximum'])}, "
            f"buffer {s['buffer']} %, weight {s['weight']}"
        )
    else:
        print("  Dynamic Memory: off")
    m = vm.get("memory")
    if m:
        print(
            f"  memory: visible {_size(m['visible'])}, assigned {_size(m['assigned'])}, "
            f"ballooned {_size(m['ballooned'])}"
        )
        if m.get("status"):  # Hyper-V Manager's columns, once the guest reported
            print(f"  memory demand {_demand(m['demand'])}, memory status {m['status']}")
        sp = m.get("smart_paging")
        if sp and sp["in_use"]:
            print(
                f"  Smart Paging: in use, {_size(sp['bytes'])} of guest memory in "
                f"{sp['file']} ({_size(sp['file_bytes'])} on disk) for {sp['since_s']} s"
            )
        elif sp:
            print(
                "  Smart Paging: not in use"
                + (
                    f" (the last ended after {sp['ended_after_s']} s, VPs paused "
                    f"{sp['paused_us']} us)"
                    if sp["ended_after_s"] is not None
                    else ""
                )
            )
    e = vm.get("enforcement")
    if e:
        print(
            f"  kernel: guest RAM {_size(e['kernel_ram'])}, cgroup limit "
            f"{_size(e['cgroup_limit'])}, "
            f"claims disagreed {e['claims_disagreements']} times"
            + (f" (last: {e['last_disagreement']})" if e["last_disagreement"] else "")
        )
    print(
        f"  image {s['image'] or '(bundled guest)'}"
        + (f", cmdline {s['cmdline']!r}" if s["cmdline"] else "")
    )


def _given(a: argparse.Namespace, *keys: str) -> dict[str, Any]:
    return {k: getattr(a, k) for k in keys if getattr(a, k) is not None}


_DM_KEYS = ("minimum", "maximum", "buffer", "weight")


def _dm_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--minimum", type=types.size, metavar="SIZE", help="Dynamic Memory minimum (e.g. 256M)"
    )
    p.add_argument(
        "--maximum", type=types.size, metavar="SIZE", help="Dynamic Memory maximum (e.g. 4G)"
    )
    p.add_argument("--buffer", type=int, help="buffer %%, 5..2000 (default 20)")
    p.add_argument(
        "--weight",
        "--priority",
        dest="weight",
        type=int,
        help="memory weight 0..100 (default 50; Set-VMMemory's -Priority)",
    )


def _dynamic(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--dynamic",
        dest="dynamic_memory",
        action="store_const",
        const=True,
        help="Dynamic Memory on",
    )
    g.add_argument(
        "--static",
        dest="dynamic_memory",
        action="store_const",
        const=False,
        help="Dynamic Memory off",
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "vm",
        help="create, start, stop, inspect and migrate VMs (through the VMMS)",
        description="Create, start, stop, inspect and migrate VMs through the VMMS (`pyhv vmms serve`).",
        # no abbreviations: `migrate --to` must not read as this group's --token(-file)
        allow_abbrev=False,
    )
    add_client_options(p)
    cmds = p.add_subparsers(dest="vm_command", metavar="COMMAND", required=True)

    def command(
        name: str, doc: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        c: argparse.ArgumentParser = cmds.add_parser(
            name, help=doc.split("\n")[0].rstrip("."), description=doc
        )
        if name != "list":
            c.add_argument("name", metavar="NAME", help="the VM's name")
        # `vm migrate --token-file` is the destination's token; the source's goes before `migrate`
        add_client_options(c, again=True, token=name != "migrate")
        c.set_defaults(func=func)
        return c

    c = command("create", "Create VM NAME (stored; `pyhv vm start NAME` runs it).", create)
    c.add_argument(
        "--memory", "-m", type=types.size, metavar="SIZE", help="startup memory (default 512M)"
    )
    c.add_argument("--vps", type=int, help="virtual processors (default 1)")
    _dynamic(c)
    _dm_options(c)
    c.add_argument(
        "--page-file-size",
        type=types.size,
        metavar="SIZE",
        help="a page file's disk on VMBus the guest pages to (e.g. 256M; needs --dynamic)",
    )
    c.add_argument(
        "--dirty-ring",
        dest="dirty_ring_entries",
        type=int,
        metavar="ENTRIES",
        help="log dirty pages in a ring of ENTRIES per VP (a power of two, 256-65536; "
        "16384: smaller rings overflow under load on this KVM) instead of KVM's bitmap: "
        "`vm migrate --dirty-limit` needs it (default 0: bitmap)",
    )
    c.add_argument(
        "--huge-pages",
        action="store_true",
        default=None,
        help="guest RAM in 2 MiB pages (freed memory leaves the host faster)",
    )
    c.add_argument(
        "--image",
        "--kernel",
        dest="image",
        metavar="NAME",
        help="guest image: a file name in the VMMS's images directory (`pyhv vmms serve "
        "--images DIR`), default pyhv-guest (the bundled guest)",
    )
    c.add_argument("--cmdline", help="guest kernel command line")
    c.add_argument(
        "--cluster",
        metavar="ENDPOINTS",
        help="place the VM on a host of the cluster whose etcd is at ENDPOINTS (docs/cluster.md)",
    )
    c.add_argument("--affinity", action="append", default=[], metavar="GROUP",
                   help="with --cluster: run where the VMs of GROUP run (repeatable)")  # fmt: skip
    c.add_argument("--anti-affinity", action="append", default=[], metavar="GROUP",
                   help="with --cluster: never on a host with a VM of GROUP (repeatable)")  # fmt: skip
    c.add_argument("--tokens", type=Path, metavar="FILE",
                   help="with --cluster: the hosts' API tokens, lines `HOST CLUSTER_TOKEN [MIGRATION_TOKEN]` "
                   "(default $PYHV_CLUSTER_TOKENS)")  # fmt: skip
    c.add_argument("--ha", action="store_true",
                   help="with --cluster: highly available: when its host's lease ends, the "
                   "cluster starts it on another host")  # fmt: skip
    command("start", "Start VM NAME in a worker process of its own.", start)
    command("stop", "Stop VM NAME.", stop)
    command(
        "restart",
        "Stop VM NAME if it runs and start it again; on a host short of its startup memory, "
        "Smart Paging backs the gap with a file until Dynamic Memory balloons the guest down.",
        restart,
    )
    c = command("list", "List the VMs with their state.", list_vms)
    c.add_argument("--json", dest="as_json", action="store_true", help="print the API's JSON")
    c.add_argument("--cluster", metavar="ENDPOINTS",
                   help="the cluster's VMs instead (etcd at ENDPOINTS): where each runs")  # fmt: skip
    c = command("show", "Show VM NAME's state and settings.", show)
    c.add_argument("--json", dest="as_json", action="store_true", help="print the API's JSON")
    c.add_argument("--cluster", metavar="ENDPOINTS",
                   help="its record in the cluster instead (etcd at ENDPOINTS): owner, moves, "
                   "restarts")  # fmt: skip
    command("delete", "Delete VM NAME (it must be off).", delete)
    c = command(
        "memory",
        "Show or change VM NAME's memory (Set-VMMemory's settings). While it runs: minimum may "
        "only go down, maximum only up, buffer and priority change, --memory resizes it (hot-add "
        "or hot-remove, whole 2M blocks); --target moves its memory now (Dynamic Memory).",
        memory,
    )
    c.add_argument(
        "--target",
        type=types.size,
        metavar="SIZE",
        help="balloon/unballoon/hot-add towards SIZE (e.g. 768M)",
    )
    _dynamic(c)
    c.add_argument(
        "--memory",
        "--startup",
        "-m",
        dest="memory",
        type=types.size,
        metavar="SIZE",
        help="startup memory (Set-VMMemory's -StartupBytes); on a running Dynamic Memory VM "
        "a resize: hot-add or hot-remove to SIZE (whole 2M blocks)",
    )
    _dm_options(c)
    c = command(
        "migrate",
        "Live-migrate running VM NAME to the VMMS at HOST:PORT, with a progress bar. On success "
        "it runs there and is gone here; on failure it runs on here.",
        migrate,
    )
    c.add_argument(
        "--to",
        required=True,
        type=types.address,
        metavar="HOST:PORT",
        help="the destination VMMS (TCP)",
    )
    types.refuse_secret(c, "--token", "--token-file FILE or $PYHV_MIGRATION_TOKEN")
    c.add_argument(
        "--token-file",
        dest="dest_token_file",
        type=types.text_file,
        metavar="FILE",
        help="file holding the destination VMMS's migration token (its state directory's "
        "'migration-token'; default $PYHV_MIGRATION_TOKEN)",
    )
    types.add_timeout_option(c, 900.0, "for the end")
    add_migration_options(c)
    command(
        "console",
        "Attach to VM NAME's serial console (Ctrl-A x detaches; the VM keeps running).",
        console,
    )
    add_vm_trace(command)  # `pyhv vm trace`: the flight recorder (pyhv/cli/trace.py)


def create(a: argparse.Namespace) -> int:
    body = {
        "name": a.name,
        **_given(
            a,
            "memory",
            "vps",
            "dynamic_memory",
            *_DM_KEYS,
            "cmdline",
            "image",
            "page_file_size",
            "dirty_ring_entries",
            "huge_pages",
        ),
    }
    if a.cluster:
        from pyhv.cli.cluster import create_in_cluster

        _print_vm(create_in_cluster(a, body))
        return 0
    if a.affinity or a.anti_affinity or a.ha:
        raise CliError(
            "--affinity, --anti-affinity and --ha are for a VM of a cluster: give --cluster", 2
        )
    _print_vm(call(client(a), "POST", "/api/vms", body))
    return 0


def start(a: argparse.Namespace) -> int:
    _print_vm(call(client(a), "POST", f"/api/vms/{a.name}/start"))
    return 0


def restart(a: argparse.Namespace) -> int:
    _print_vm(call(client(a), "POST", f"/api/vms/{a.name}/start", {"restart": True}))
    return 0


def stop(a: argparse.Namespace) -> int:
    _print_vm(call(client(a), "POST", f"/api/vms/{a.name}/stop"))
    return 0


def list_vms(a: argparse.Namespace) -> int:
    if a.cluster:
        from pyhv.cli.cluster import list_in_cluster

        return list_in_cluster(a)
    vms = call(client(a), "GET", "/api/vms")["vms"]
    if a.as_json:
        print(json.dumps(vms, indent=1))
        return 0
    print(
        f"{'NAME':20} {'STATE':9} {'VPS':>3} {'MEMORY':>8} {'ASSIGNED':>9} {'DEMAND':>8} "
        f"{'STATUS':7} {'DM':3} REASON"
    )
    for vm in vms:
        s, m = vm["settings"], vm.get("memory") or {}
        print(
            f"{vm['name']:20} {vm['state']:9} {s['vps']:>3} {_size(s['memory']):>8} "
            f"{_size(m.get('assigned')):>9} {_demand(m.get('demand')):>8} "
            f"{m.get('status') or '-':7} {'on' if s['dynamic_memory'] else 'off':3} "
            f"{vm['reason'].splitlines()[0] if vm['reason'] else ''}"
        )
    return 0


def show(a: argparse.Namespace) -> int:
    if a.cluster:
        from pyhv.cli.cluster import show_in_cluster

        return show_in_cluster(a)
    vm = call(client(a), "GET", f"/api/vms/{a.name}")
    if a.as_json:
        print(json.dumps(vm, indent=1))
    else:
        _print_vm(vm)
    return 0


def delete(a: argparse.Namespace) -> int:
    call(client(a), "DELETE", f"/api/vms/{a.name}")
    print(f"deleted {a.name}")
    return 0


def memory(a: argparse.Namespace) -> int:
    c = client(a)
    changes = _given(a, "dynamic_memory", "memory", *_DM_KEYS)
    if "memory" in changes and call(c, "GET", f"/api/vms/{a.name}")["state"] == "running":
        # Set-VMMemory -StartupBytes on a running VM: a resize by hot-add / hot-remove, after
        # the other settings (a lowered minimum or raised maximum may be what makes room).
        size = changes.pop("memory")
        if changes:
            _print_vm(call(c, "PATCH", f"/api/vms/{a.name}", changes))
        return _resize(c, a.name, size)
    if changes:
        _print_vm(call(c, "PATCH", f"/api/vms/{a.name}", changes))
    if a.target is not None:
        call(c, "POST", f"/api/vms/{a.name}/memory", {"target": a.target})
        print(f"{a.name}: memory target {format_size(a.target)} sent to the worker")
    if not changes and a.target is None:
        st = call(c, "GET", f"/api/vms/{a.name}/memory")
        sizes = " ".join(f"{k} {_size(st.get(k))}" for k in _STATUS_SIZES)
        print(f"{a.name}: {sizes}" + (" (an operation is in progress)" if st.get("busy") else ""))
    return 0


def _resize(c: Any, name: str, size: int) -> int:
    from pyhv.vmms.resize import shortfall

    r = call(c, "POST", f"/api/vms/{name}/memory/resize", {"memory": size})
    if not r["complete"]:
        raise CliError(f"{shortfall(r)}; startup memory is now {format_size(r['startup'])}")
    how = (
        f"added {format_size(r['added'])}" if r["added"]
        else f"removed {format_size(r['removed'])}" if r["removed"] else "unchanged"
    )  # fmt: skip
    print(
        f"{name}: memory {format_size(r['before'])} -> {format_size(r['visible'])} ({how}); "
        f"startup memory {format_size(r['startup'])}"
    )
    return 0


def migrate(a: argparse.Namespace) -> int:
    from pyhv.cli.migrate import ProgressBar, summary

    dest_token = (a.dest_token_file or "").strip() or os.environ.get(
        "PYHV_MIGRATION_TOKEN", ""
    ).strip()
    if not dest_token:
        raise CliError(
            "give the destination VMMS's migration token: --token-file FILE (its state "
            "directory's 'migration-token') or $PYHV_MIGRATION_TOKEN",
            2,
        )
    to = f"{a.to[0]}:{a.to[1]}"
    c = client(a)
    rec = call(
        c,
        "POST",
        f"/api/vms/{a.name}/migrate",
        {"destination": to, "token": dest_token, "options": migration_options(a)},
    )
    bar = ProgressBar()
    seen: dict[str, Any] | None = None
    deadline = time.monotonic() + a.timeout
    try:
        while rec["state"] not in ("done", "failed", "in-doubt"):
            if time.monotonic() > deadline:
                raise CliError(
                    f"migration {rec['id']} did not end within {a.timeout:g} s (it goes on)"
                )
            time.sleep(0.1)
            rec = call(c, "GET", f"/api/migrations/{rec['id']}")
            p = rec.get("progress")
            if p and p != seen and p.get("phase") != "in-doubt":
                bar(p)
                seen = p
    finally:
        bar.finish()
    if rec["state"] == "done":
        if rec.get("result"):
            print(summary(rec["result"]))
        print(f"{a.name} runs on {to} now" + (f" ({rec['error']})" if rec["error"] else ""))
        return 0
    raise CliError(f"migration of {a.name} to {to} {rec['state']}: {rec['error']}")


def console(a: argparse.Namespace) -> int:
    from pyhv.vmms.client import ClientError
    from pyhv.worker.terminal import EscapeDecoder

    try:
        sock = client(a).console(a.name)
    except ClientError as e:
        raise CliError(str(e)) from None
    tty = os.isatty(0)
    restore = _raw_mode(0) if tty else None
    out = sys.stdout.buffer
    if tty:
        out.write(f"[pyhv] console of {a.name}: Ctrl-A x detaches\r\n".encode())
        out.flush()
    decoder = EscapeDecoder()
    stdin_open = True
    try:
        while True:
            fds = [sock] + ([0] if stdin_open else [])
            ready, _, _ = select.select(fds, [], [], 0 if sock.pending() else None)
            if sock in ready or sock.pending():
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
    return 0


def _raw_mode(fd: int) -> Callable[[], None]:
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    tty.setraw(fd)
    return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)
