"""`pyhv counters`: the VMMS's counters by Perfmon path, refreshed like typeperf."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.vmms import add_client_options, call, client


def register(sub: Any) -> None:
    doc = "The VMMS's counters by Perfmon path, refreshed like typeperf (Ctrl-C ends)."
    p = sub.add_parser("counters", help="the VMMS's counters by Perfmon path", description=doc)
    add_client_options(p)
    p.add_argument("--once", action="store_true", help="print once and exit")
    p.add_argument(
        "--interval", type=types.positive, default=1.0, help="seconds between refreshes (default 1)"
    )
    p.add_argument(
        "--counter",
        "-c",
        dest="patterns",
        action="append",
        default=[],
        metavar="TEXT",
        help="only paths containing TEXT (repeatable)",
    )
    p.set_defaults(func=counters_command)


def counters_command(a: argparse.Namespace) -> int:
    c = client(a)
    tty = os.isatty(1)
    try:
        while True:
            snap = call(c, "GET", "/api/counters")["counters"]
            rows = sorted(
                (p, v) for p, v in snap.items() if not a.patterns or any(x in p for x in a.patterns)
            )
            width = max((len(p) for p, _ in rows), default=10)
            text = f"{'Counter':{width}}  {'Value':>12}\n"
            text += "".join(f"{p:{width}}  {v:>12.2f}\n" for p, v in rows)
            if not rows:
                text += "(no counters yet: start a VM)\n"
            if tty and not a.once:
                text = "\x1b[H\x1b[2J" + time.strftime("%H:%M:%S\n") + text
            print(text, end="", flush=True)
            if a.once:
                return 0
            time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0
