"""The flight recorder on the command line: `pyhv vm trace NAME` watches a running VM's events
live (or records them to a file with --out), `pyhv trace show FILE` reads such a file back.
Events and the file format: pyhv.trace; what each event carries: docs/trace.md."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError

_ONLY_HELP = "only these kinds, comma-separated: dm,io,mmio,msr,vmbus,balancer,migration"


def _only(a: argparse.Namespace) -> frozenset[str] | None:
    from pyhv.trace.events import TraceError, parse_only

    try:
        return parse_only(a.only)
    except TraceError as e:
        raise CliError(str(e), 2) from None


def _printer(as_json: bool) -> Callable[[Any], None]:
    out = sys.stdout

    def show(e: Any) -> None:
        out.write(json.dumps(e.to_wire(), separators=(",", ":")) if as_json else e.line())
        out.write("\n")
        out.flush()

    return show


# --------------------------------------------------------------------------- pyhv vm trace
def add_vm_trace(command: Callable[..., argparse.ArgumentParser]) -> None:
    c = command(
        "trace",
        "Show VM NAME's flight recorder events live (intercepts, VMBus packets, Dynamic Memory "
        "messages decoded, balancer decisions, migration phases) until Ctrl-C or the VM ends. "
        "Tracing is on in the VM only while someone watches.",
        vm_trace,
    )
    c.add_argument("--only", metavar="KINDS", help=_ONLY_HELP)
    c.add_argument("--json", dest="as_json", action="store_true", help="one JSON object a line")
    c.add_argument("--out", metavar="FILE", help="record to FILE (read it with `pyhv trace show`)")
    c.add_argument(
        "--max-size",
        type=types.size,
        default=256 << 20,
        metavar="SIZE",
        help="stop recording to --out at this size (default 256M)",
    )
    c.add_argument("--count", type=int, metavar="N", help="end after N events")


def vm_trace(a: argparse.Namespace) -> int:
    from pyhv.cli.vmms import client
    from pyhv.trace.events import TraceError, event_from_wire
    from pyhv.trace.tracefile import TraceWriter
    from pyhv.vmms.client import ClientError

    only = _only(a)
    if a.count is not None and a.count < 1:
        raise CliError(f"--count {a.count}: give 1 or more", 2)
    try:
        f = open(a.out, "xb") if a.out else None  # noqa: SIM115 - closed below
    except OSError as err:
        raise CliError(f"cannot create {a.out}: {err.strerror} (choose a new file)") from None
    writer = TraceWriter(f, a.max_size) if f is not None else None
    show = _printer(a.as_json)
    seen = 0
    try:
        try:
            sock = client(a).trace(a.name, only)  # only those sources are turned on
        except ClientError as err:
            raise CliError(str(err)) from None
        with sock, sock.makefile("rb") as lines:
            for raw in lines:
                try:
                    e = event_from_wire(json.loads(raw))
                except (ValueError, TraceError) as err:
                    raise CliError(f"the VMMS sent a line that is not an event: {err}") from None
                if only is not None and e.kind not in only and e.kind != "dropped":
                    continue
                if writer is not None:
                    writer.write(e)
                    if writer.full:
                        print(f"{a.out} reached {writer.size} bytes: stopped", file=sys.stderr)
                        break
                else:
                    show(e)
                seen += 1
                if a.count is not None and seen >= a.count:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        if f is not None:
            f.close()
            assert writer is not None
            print(f"{writer.written} events recorded to {a.out}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- pyhv trace show
def register(sub: Any) -> None:
    doc = "Read flight recorder files written by `pyhv vm trace NAME --out FILE`."
    p = sub.add_parser("trace", help="read flight recorder files", description=doc)
    cmds = p.add_subparsers(dest="trace_command", metavar="COMMAND", required=True)
    s = cmds.add_parser(
        "show",
        help="print a trace file's events",
        description="Print the events of a trace file (checked as it is read), or a summary "
        "per kind: counts and handler time p50/p99.",
    )
    s.add_argument("file", metavar="FILE")
    s.add_argument("--only", metavar="KINDS", help=_ONLY_HELP)
    s.add_argument("--json", dest="as_json", action="store_true", help="one JSON object a line")
    s.add_argument("--summary", action="store_true", help="counts and handler times per kind")
    s.set_defaults(func=show_file)


def show_file(a: argparse.Namespace) -> int:
    from pyhv.trace.events import TraceError
    from pyhv.trace.tracefile import read_events

    only = _only(a)
    try:
        f = open(a.file, "rb")  # noqa: SIM115 - closed below
    except OSError as err:
        raise CliError(f"cannot read {a.file}: {err.strerror}") from None
    with f:
        events = (
            e
            for e in read_events(f, a.file)
            if only is None or e.kind in only or e.kind == "dropped"
        )
        try:
            if a.summary:
                for line in summary(events):
                    print(line)
            else:
                show = _printer(a.as_json)
                for e in events:
                    show(e)
        except TraceError as err:
            sys.stdout.flush()
            raise CliError(str(err)) from None
    return 0


def _percentile(sorted_ns: list[int], q: float) -> float:
    return sorted_ns[min(len(sorted_ns) - 1, int(q * len(sorted_ns)))] / 1000.0


_PART: dict[str, Callable[[Any], str]] = {
    "io": lambda e: f"port {e.port:#x}",
    "mmio": lambda e: f"gpa {e.gpa:#x}",
    "msr": lambda e: f"msr {e.msr:#x}",
    "dm": lambda e: e.message,
    "vmbus": lambda e: f"{e.channel} {e.direction}",
    "balancer": lambda e: e.action,
    "migration": lambda e: e.phase,
}


def summary(events: Iterable[Any]) -> list[str]:
    """Per kind: the count, the handler time p50/p99 (intercepts), and what it was made of
    (DM message types, ports, MSRs, balancer actions, migration phases)."""
    counts: dict[str, int] = {}
    times: dict[str, list[int]] = {}
    parts: dict[str, dict[str, int]] = {}
    dropped = 0
    for e in events:
        if e.kind == "dropped":
            dropped += e.count
            continue
        counts[e.kind] = counts.get(e.kind, 0) + 1
        ns = getattr(e, "handler_ns", None)
        if ns is not None:
            times.setdefault(e.kind, []).append(ns)
        what = _PART[e.kind](e)
        by = parts.setdefault(e.kind, {})
        by[what] = by.get(what, 0) + 1
    lines = [f"{'KIND':10} {'EVENTS':>8} {'HANDLER p50':>12} {'p99':>10}"]
    for kind in sorted(counts):
        ns_list = sorted(times.get(kind, []))
        p50 = f"{_percentile(ns_list, 0.5):.1f} us" if ns_list else "-"
        p99 = f"{_percentile(ns_list, 0.99):.1f} us" if ns_list else "-"
        lines.append(f"{kind:10} {counts[kind]:>8} {p50:>12} {p99:>10}")
        top = sorted(parts[kind].items(), key=lambda kv: -kv[1])[:8]
        lines.append("    " + ", ".join(f"{w}: {n}" for w, n in top))
    if dropped:
        lines.append(f"dropped    {dropped:>8} (the reader did not keep up)")
    if not counts and not dropped:
        lines.append("(no events)")
    return lines
