"""`pyhv run` and `pyhv demo`: a VM in this process (or one worker process of its own), its
serial console on this terminal, without a VMMS. Only what booting needs is imported, and only
once the arguments are known to be good: this is the path `bench/boot.py` times."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError

if TYPE_CHECKING:
    from pyhv.worker.config import VmConfig
    from pyhv.worker.outcome import VmEnd

DEMO = [
    ("The guest boots and its shell shows its memory: RAM given, committed, free.", "mem"),
    (
        "testlimit commits 64 MiB and touches it (Sysinternals' testlimit -m, one chunk).",
        "testlimit -m 64 -c 1",
    ),
    ("Committed memory went up by 64 MiB.", "mem"),
    ("kill frees what testlimit holds.", "kill"),
    ("ticks counts the guest's timer interrupts: its clock runs.", "ticks"),
    ("poweroff writes the exit status to port 0xF4 and the worker ends the VM.", "poweroff"),
]

RUN_HELP = """Boot the guest with its serial console on this terminal, without a VMMS (for VMs
the VMMS keeps, see `pyhv vm`).

Interactive keys: Ctrl-A x quits, Ctrl-A h shows help. With --script or --command the
commands are typed at the shell prompt one by one and pyhv exits with the guest's
power-off status (3 if the guest triple-faults, 4 on an emulation error)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="boot the guest on this terminal (no VMMS)", description=RUN_HELP
    )
    types.add_memory_option(p, "512M")
    p.add_argument("--vps", type=int, default=1, help="virtual processors (default 1)")
    p.add_argument("--cmdline", default="", help="guest kernel command line")
    p.add_argument(
        "--script", type=types.text_file, metavar="FILE", help="run the shell commands in FILE"
    )
    p.add_argument(
        "--command",
        "-c",
        dest="commands",
        action="append",
        default=[],
        metavar="COMMAND",
        help="a shell command (repeatable)",
    )
    types.add_kernel_option(p)
    p.add_argument(
        "--process", action="store_true", help="run the VM in a worker process of its own"
    )
    types.add_timeout_option(p, 300.0, "per prompt")
    p.add_argument(
        "--dynamic-memory", action="store_true", help="Dynamic Memory (balloon, hot-add)"
    )
    p.add_argument(
        "--startup",
        type=types.size,
        metavar="SIZE",
        help="Dynamic Memory startup RAM (same as --memory)",
    )
    p.add_argument(
        "--minimum",
        type=types.size,
        metavar="SIZE",
        help="Dynamic Memory minimum RAM (default: startup)",
    )
    p.add_argument(
        "--maximum",
        type=types.size,
        metavar="SIZE",
        help="Dynamic Memory maximum RAM (default: startup)",
    )
    p.add_argument(
        "--page-file-size",
        type=types.size,
        metavar="SIZE",
        help="a page file's disk on VMBus the guest pages to (needs --dynamic-memory)",
    )
    p.add_argument(
        "--page-file",
        metavar="PATH",
        help="the page file's host file (default: a temporary file, removed at the end)",
    )
    p.add_argument(
        "--huge-pages",
        action="store_true",
        help="guest RAM in 2 MiB pages on a private tmpfs (freed memory leaves the host faster; "
        "needs CAP_SYS_ADMIN)",
    )
    p.add_argument("--control", metavar="PATH", help="serve a control socket for `pyhv memory`")
    p.set_defaults(func=run_command)

    p = sub.add_parser(
        "demo",
        help="a short scripted session with the guest's shell, narrated",
        description="A short scripted session with the guest's shell, narrated.",
    )
    types.add_memory_option(p, "512M")
    p.add_argument("--image", metavar="FILE", help="guest image (default: the bundled guest)")
    p.set_defaults(func=demo_command)


def vm_config(
    memory: int, vps: int = 1, cmdline: str = "", image: str | None = None, **dynamic: Any
) -> VmConfig:
    """A checked VmConfig (the bundled guest by default), or the CliError that says why not."""
    from pyhv.worker.config import ConfigError, VmConfig

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise CliError(
            "/dev/kvm is missing or not accessible: pyhv runs guests under Linux KVM; load "
            "the kvm module or run where /dev/kvm exists (and join the kvm group)"
        )
    try:
        if image is None:
            image = str(_bundled_image())
        return VmConfig.create(image=image, memory=memory, vps=vps, cmdline=cmdline, **dynamic)
    except ConfigError as e:
        raise CliError(str(e), 2) from None


def _bundled_image() -> object:
    from pyhv.guest_image import GuestBuildError, image_path

    try:
        return image_path()
    except (GuestBuildError, OSError) as e:
        raise CliError(f"cannot build the guest image: {e}") from None


def _start(config: VmConfig, output: Callable[[bytes], None], process: bool) -> Any:
    from pyhv.worker.boot import ImageError

    vm: Any
    if process:
        from pyhv.worker.process import WorkerProcess

        vm = WorkerProcess(config, output=output)
    else:
        from pyhv.worker.vm import VirtualMachine

        vm = VirtualMachine(config, output=output)
    try:
        vm.start()
    except ImageError as e:
        raise CliError(f"cannot boot {config.image}: {e}") from None
    except OSError as e:
        raise CliError(f"cannot create the VM: {e}") from None
    return vm


def _writer(fd: int, tty: bool) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        if not tty:
            data = data.replace(b"\r\n", b"\n")
        try:
            os.write(fd, data)
        except OSError:
            pass  # the terminal went away; the VM goes on until it is stopped

    return write


def _report(end: VmEnd) -> int:
    if end.failed:
        sys.stderr.write("\n" + end.describe() + "\n")
    else:
        sys.stderr.write(f"\n[pyhv] {end.describe()}\n")
    return end.exit_code


def run_command(a: argparse.Namespace) -> int:
    dm = {
        "startup": a.startup,
        "minimum": a.minimum,
        "maximum": a.maximum,
        "page_file_size": a.page_file_size,
        "page_file": a.page_file,
    }
    config = vm_config(
        a.memory,
        a.vps,
        a.cmdline,
        a.image,
        dynamic_memory=a.dynamic_memory,
        huge_pages=a.huge_pages,
        **{k: v for k, v in dm.items() if v is not None},
    )
    lines: list[str] | None = None
    if a.script is not None or a.commands:
        from pyhv.worker.script import script_lines

        lines = script_lines(a.script) if a.script is not None else []
        for c in a.commands:
            lines += script_lines(c.replace(";", "\n"))
    write = _writer(1, os.isatty(1))
    vm = _start(config, write, a.process)
    server = None
    try:
        if a.control is not None:
            from pyhv.worker.control import ControlError, ControlServer

            try:
                server = ControlServer(a.control, vm)
            except ControlError as e:
                raise CliError(str(e)) from None
        if lines is None:
            from pyhv.worker.terminal import interactive

            if os.isatty(0):
                write(b"[pyhv] console: Ctrl-A x quits, Ctrl-A h help\r\n")
            end = interactive(vm, 0, write)
        else:
            from pyhv.worker.script import ScriptError, run_script

            try:
                end = run_script(vm, lines, timeout=a.timeout)
            except ScriptError as e:
                raise CliError(str(e)) from None
    finally:
        if server is not None:
            server.close()
        vm.close()
    return _report(end)


def demo_command(a: argparse.Namespace) -> int:
    config = vm_config(a.memory, 1, "", a.image)
    tty = os.isatty(1)
    write = _writer(1, tty)
    pending = iter(n for n, _ in DEMO)

    def narrate(command: str) -> None:
        # Called at a prompt: an empty command makes the guest print a fresh prompt below the
        # narration, so each command appears right under what it shows.
        if command:
            return
        text = f"\n# {next(pending)}"
        write((f"\x1b[1;36m{text}\x1b[0m" if tty else text).encode())

    from pyhv.worker.script import ScriptError, run_script

    print(
        f"pyhv demo: a {config.memory >> 20} MiB VM with one VP boots the reference guest by "
        "direct boot; its serial console follows. (Measured on PVM: guest kernel code is "
        "emulated here, so commands take a moment.)",
        flush=True,
    )
    vm = _start(config, write, False)
    try:
        steps = [x for _, c in DEMO for x in ("", c)]
        try:
            end = run_script(vm, steps, before=narrate)
        except ScriptError as e:
            raise CliError(str(e)) from None
    finally:
        vm.close()
    return _report(end)
