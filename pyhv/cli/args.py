"""Argument types shared by pyhv's commands: each turns a bad value into argparse's usage error
(the value, what to use, exit status 2) instead of a traceback later."""

from __future__ import annotations

import argparse
import os

from pyhv.cli.errors import CliError
from pyhv.sizes import SizeError, parse_size


class Formatter(argparse.HelpFormatter):
    """argparse's help layout, keeping the paragraphs of a description, told the terminal's
    width by os: argparse asks shutil, whose import is ms of every `pyhv run`, --help or not."""

    def __init__(self, prog: str, **kw: int) -> None:
        if "width" not in kw:
            try:
                columns = int(os.environ.get("COLUMNS") or os.get_terminal_size(2).columns)
            except (OSError, ValueError):
                columns = 80
            kw["width"] = max(columns, 40) - 2
        super().__init__(prog, **kw)  # type: ignore[arg-type]

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(fill(p, width, indent) for p in text.split("\n\n"))


class Parser(argparse.ArgumentParser):
    """pyhv's parsers (subcommands inherit it): the Formatter above."""

    def __init__(self, *args: object, **kw: object) -> None:
        kw.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kw)  # type: ignore[arg-type]


def size(text: str) -> int:
    """A memory size (``512M``, ``2G``, ``1.5GiB``, bytes) as bytes."""
    try:
        return parse_size(text)
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_memory_option(p: argparse.ArgumentParser, default: str) -> None:
    """--memory/-m SIZE: the guest's RAM."""
    p.add_argument(
        "--memory",
        "-m",
        type=size,
        default=default,
        metavar="SIZE",
        help=f"guest RAM (default {default})",
    )


def add_timeout_option(p: argparse.ArgumentParser, default: float, what: str) -> None:
    """--timeout SECONDS: how long the command waits for `what` ("per prompt", "for a source")."""
    p.add_argument(
        "--timeout",
        type=positive,
        default=default,
        help=f"seconds to wait {what} (default {default:g})",
    )


def add_kernel_option(p: argparse.ArgumentParser) -> None:
    """--kernel/--image FILE: what the VM boots (pyhv.worker.loaders tells the protocol)."""
    p.add_argument(
        "--kernel",
        "--image",
        dest="image",
        metavar="FILE",
        help="guest kernel: a pyhv guest ELF, a PVH ELF or a Multiboot v1 kernel "
        "(default: the bundled guest)",
    )


def positive(text: str) -> float:
    """A number of seconds or a scale factor, > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def address(text: str) -> tuple[str, int]:
    """HOST:PORT (an empty host is 127.0.0.1)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (for example 127.0.0.1:7777)")
    return host or "127.0.0.1", int(port)


def text_file(path: str) -> str:
    """The contents of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise argparse.ArgumentTypeError(f"{path} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None


def token(args: argparse.Namespace, what: str) -> str:
    """A bearer or migration token from --token or --token-file (already read)."""
    value = (getattr(args, "token_file", None) or "").strip() or getattr(args, "token", None)
    if not value:
        raise CliError(f"give {what}: --token-file FILE or --token T", 2)
    return str(value)
