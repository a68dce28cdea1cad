"""The `pyhv` command line: one argparse parser, one module per command group.

- `pyhv run`, `pyhv demo` (run.py): a VM on this terminal, without a VMMS.
- `pyhv vm ...` (vm.py): the way to act on a VM the VMMS keeps; `pyhv vmms serve` (vmms.py)
  runs that service; `pyhv counters` (counters.py) reads its counters.
- `pyhv memory --control` (control.py) and `pyhv migrate` (migrate.py): what `pyhv vm` cannot do,
  for VMs run by `pyhv run` without a VMMS (its control socket; worker-to-worker migration).
- `pyhv experiment ...` (experiment.py): the book's experiments.
- `pyhv vm trace NAME` and `pyhv trace show FILE` (trace.py): the flight recorder.
- `pyhv cluster simulate|hosts|balance|init|add-host` (cluster.py): pyhv on many hosts (docs/cluster.md).

argparse (the standard library's, about 1 ms to import) rather than click (about 20 ms here),
and every command imports what it needs only when it runs: the time from process start to the
guest's first serial byte is then the interpreter's start, the boot path's imports and the
guest's own work. Sizes are read by pyhv.sizes everywhere.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import NoReturn

from pyhv.cli.args import Parser
from pyhv.cli.errors import CliError

__all__ = ["CliError", "main", "parser", "run_cli"]

# The module (pyhv.cli.X) that declares each command. `pyhv run ...` imports and builds only
# run.py's parsers (all of them cost ~7 ms, a tenth of a boot); help or a typo builds them all.
_COMMANDS = {
    "run": "run",
    "demo": "run",
    "vm": "vm",
    "vmms": "vmms",
    "counters": "counters",
    "memory": "control",
    "migrate": "migrate",
    "experiment": "experiment",
    "trace": "trace",
    "cluster": "cluster",
}


def parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of all commands, or (given a command's name) only of the group declaring it."""
    from pyhv import __version__

    p = Parser(
        prog="pyhv",
        description="pyhv: the Hyper-V stack of Windows Internals on Linux KVM.",
    )
    p.add_argument("--version", action="version", version=f"pyhv {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    group = _COMMANDS.get(command or "")
    for name in (group,) if group else dict.fromkeys(_COMMANDS.values()):
        importlib.import_module(f"pyhv.cli.{name}").register(sub)
    return p


def run_cli(argv: list[str]) -> int:
    """Run one command line; returns the exit status (argparse's usage errors exit with 2)."""
    args = parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as e:
        sys.stderr.write(f"Error: {e}\n")
        return e.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `pyhv vm list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def main(argv: list[str] | None = None) -> NoReturn:
    sys.exit(run_cli(sys.argv[1:] if argv is None else argv))
