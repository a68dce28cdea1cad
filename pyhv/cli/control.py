"""`pyhv memory --control PATH`: the memory of a VM that `pyhv run --control PATH` runs without a
VMMS, through the worker's control socket. A VM the VMMS keeps is `pyhv vm memory NAME`."""

from __future__ import annotations

import argparse
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError
from pyhv.sizes import format_size

HELP = """Show the memory of a VM started by `pyhv run --control PATH` (no VMMS): assigned,
visible, ballooned, the guest's last status report; with --target, balloon or add memory
towards SIZE. For a VM the VMMS keeps use `pyhv vm memory NAME` instead."""

PAGE = 4096


def register(sub: Any) -> None:
    p = sub.add_parser(
        "memory", help="memory of a `pyhv run --control` VM (no VMMS)", description=HELP
    )
    p.add_argument("--control", metavar="PATH", required=True, help="the VM's control socket")
    what = p.add_mutually_exclusive_group()
    what.add_argument(
        "--target", type=types.size, metavar="SIZE", help="move the VM's memory to SIZE (e.g. 768M)"
    )
    what.add_argument(
        "--hot-remove",
        type=types.size,
        nargs="?",
        const=-1,
        metavar="SIZE",
        help="take SIZE back from the guest offline (DM hot-remove; no SIZE: all hot-added "
        "memory): its visible memory falls",
    )
    p.set_defaults(func=memory_command)


def _pages(n: object) -> str:
    return format_size(n * PAGE) if isinstance(n, int) else "-"


def format_memory_status(st: dict[str, Any], now: float | None = None) -> str:
    """What `pyhv memory` prints: the VM's memory and the guest's last status report."""
    import time

    lines = [
        f"dynamic memory: {st.get('state')} (protocol {st.get('protocol') or '-'})",
        f"assigned: {_pages(st.get('assigned_pages'))}",
        f"visible: {_pages(st.get('visible_pages'))}",
        f"ballooned: {_pages(st.get('ballooned_pages'))}",
        f"hot-added: {_pages(st.get('hot_added_pages'))}",
        f"hot-remove: {'on' if st.get('hot_remove') else 'off'}"
        + (f", {_pages(st['removed_pages'])} offline" if st.get("removed_pages") else ""),
        f"range: {_pages(st.get('minimum_pages'))} .. {_pages(st.get('maximum_pages'))}",
    ]
    last = st.get("last_status")
    if isinstance(last, dict):
        age = (now or time.time()) - float(last.get("time", 0))
        pressure = last.get("pressure")
        lines.append(
            f"last status report: committed {_pages(last.get('committed_pages'))}, available "
            f"{_pages(last.get('available_pages'))}, pressure "
            f"{'-' if pressure is None else f'{pressure:.0f}'}, {age:.1f} s ago"
        )
    else:
        lines.append("last status report: none yet")
    if st.get("operation") or st.get("goal_pages") is not None:
        lines.append(f"in progress: {st.get('operation') or 'waiting'}")
    if st.get("last_error"):
        lines.append(f"last error: {st['last_error']}")
    bad = st.get("bad_messages")
    if bad:
        lines.append(f"refused guest messages: {bad}")
    return "\n".join(lines)


def memory_command(a: argparse.Namespace) -> int:
    from pyhv.worker.control import ControlError, request
    from pyhv.worker.messages import ControlHotRemove, ControlStatus, ControlTarget

    msg: ControlStatus | ControlTarget | ControlHotRemove = ControlStatus()
    if a.target is not None:
        msg = ControlTarget(a.target)
    elif a.hot_remove is not None:
        msg = ControlHotRemove(None if a.hot_remove < 0 else a.hot_remove)
    try:
        reply = request(a.control, msg)
    except ControlError as e:
        raise CliError(str(e)) from None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error", "the VM refused the request")))
    plan = reply.get("plan")
    if isinstance(plan, dict) and "requested_pages" in plan:
        print(f"hot-remove: {format_size(int(plan['requested_pages']) * PAGE)} asked of the guest")
    elif isinstance(plan, dict):
        goal = int(plan.get("goal_pages", 0)) * PAGE
        note = " (clamped to the VM's minimum/maximum)" if plan.get("clamped") else ""
        print(f"target: {format_size(goal)}{note}")
    status = reply.get("status")
    if isinstance(status, dict):
        print(format_memory_status(status))
    return 0
