"""Argument types shared by pyhv's commands: each turns a bad value into argparse's usage error
(the value, what to use, exit status 2) instead of a traceback later."""

from __future__ import annotations

import argparse
import os
from typing import Any

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


def text_file_or_error(path: str) -> str:
    """The contents of a UTF-8 text file; CliError (status 2) naming it."""
    try:
        return text_file(path)
    except argparse.ArgumentTypeError as e:
        raise CliError(str(e), 2) from None


def token(args: argparse.Namespace, what: str, env: str = "PYHV_MIGRATION_TOKEN") -> str:
    """A token from --token-file (already read) or the environment variable `env`: never from
    the command line, where `ps` shows it."""
    value = (getattr(args, "token_file", None) or "").strip() or os.environ.get(env, "").strip()
    if not value:
        raise CliError(f"give {what}: --token-file FILE or ${env}", 2)
    return value


class _SecretOnCommandLine(argparse.Action):
    """An option that would put a secret on the command line: refused, saying what to use."""

    def __init__(self, *args: Any, instead: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        parser.error(
            f"{self.option_strings[0]} would show the secret to every user (`ps`, shell "
            f"history): use {self.instead}"
        )


def refuse_secret(p: argparse.ArgumentParser, option: str, instead: str) -> None:
    """`option VALUE` is refused with a message naming `instead` (a file or the environment)."""
    p.add_argument(
        option,
        action=_SecretOnCommandLine,
        instead=instead,
        dest=f"_refused_{option.strip('-').replace('-', '_')}",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
