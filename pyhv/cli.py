"""The `pyhv` command line. Heavy modules are imported inside the commands, so starting a VM
does not pay for what it does not use."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, TextIO

import click

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


class _Failure(click.ClickException):
    """A clear message and a non-zero exit, no traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = code  # type: ignore[misc]


def _fail(message: str, code: int = 1) -> click.ClickException:
    return _Failure(message, code)


def _config(memory: str, vps: int, cmdline: str, image: str | None) -> VmConfig:
    from pyhv.worker.config import ConfigError, VmConfig

    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise _fail(
            "/dev/kvm is missing or not accessible: pyhv runs guests under Linux KVM; load the "
            "kvm module or run where /dev/kvm exists (and add yourself to the kvm group)"
        )
    try:
        from pyhv.worker.config import parse_size

        parse_size(memory)  # report a bad size before building the image
        if image is None:
            image = str(_bundled_image())
        return VmConfig.create(image=image, memory=memory, vps=vps, cmdline=cmdline)
    except ConfigError as e:
        raise _fail(str(e), 2) from None


def _bundled_image() -> object:
    try:
        from pyhv.guest_image import image_path
    except ImportError as e:
        raise _fail(f"the bundled guest is not available ({e}): pass --image FILE") from None
    try:
        return image_path()
    except Exception as e:  # noqa: BLE001 - the builder says what is missing (gcc, sources)
        raise _fail(f"cannot build the guest image: {e}") from None


def _start(config: VmConfig, output: object, process: bool) -> object:
    from pyhv.worker.boot import ImageError

    if process:
        from pyhv.worker.process import WorkerProcess

        vm: object = WorkerProcess(config, output=output)  # type: ignore[arg-type]
    else:
        from pyhv.worker.vm import VirtualMachine

        vm = VirtualMachine(config, output=output)  # type: ignore[arg-type]
    try:
        vm.start()  # type: ignore[attr-defined]
    except ImageError as e:
        raise _fail(f"cannot boot {config.image}: {e}") from None
    except OSError as e:
        raise _fail(f"cannot create the VM: {e}") from None
    return vm


def _writer(fd: int, tty: bool):  # type: ignore[no-untyped-def]
    def write(data: bytes) -> None:
        if not tty:
            data = data.replace(b"\r\n", b"\n")
        try:
            os.write(fd, data)
        except OSError:
            pass  # the terminal went away; the VM goes on until it is stopped

    return write


def _report(end: VmEnd) -> None:
    if end.failed:
        click.echo("\n" + end.describe(), err=True)
        raise SystemExit(end.exit_code)
    click.echo(f"\n[pyhv] {end.describe()}", err=True)
    raise SystemExit(end.exit_code)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pyhv")
def cli() -> None:
    """pyhv: the Hyper-V stack of Windows Internals on Linux KVM."""


@cli.command()
@click.option("--memory", "-m", default="512M", show_default=True, help="guest RAM (K, M, G units)")
@click.option("--vps", default=1, show_default=True, type=int, help="number of virtual processors")
@click.option("--cmdline", default="", help="guest kernel command line")
@click.option("--script", type=click.File("r"), help="run the shell commands in FILE, one a line")
@click.option(
    "--command", "-c", "commands", multiple=True, help="a shell command to run (repeatable)"
)
@click.option(
    "--image", type=click.Path(dir_okay=False), help="guest image (default: the bundled one)"
)
@click.option("--process", is_flag=True, help="run the VM in its own worker process")
@click.option("--timeout", default=300.0, show_default=True, help="seconds to wait for each prompt")
def run(
    memory: str,
    vps: int,
    cmdline: str,
    script: TextIO | None,
    commands: tuple[str, ...],
    image: str | None,
    process: bool,
    timeout: float,
) -> None:
    """Boot the guest with its serial console on this terminal.

    Interactive keys: Ctrl-A x quits, Ctrl-A h shows help. With --script or --command the
    commands are typed at the shell prompt one by one and pyhv exits with the guest's
    power-off status.
    """
    config = _config(memory, vps, cmdline, image)
    lines: list[str] | None = None
    if script is not None or commands:
        from pyhv.worker.script import script_lines

        lines = script_lines(script.read()) if script is not None else []
        for c in commands:
            lines += script_lines(c.replace(";", "\n"))
    out_tty = os.isatty(1)
    write = _writer(1, out_tty)
    vm = _start(config, write, process)
    try:
        if lines is None:
            from pyhv.worker.terminal import HELP, interactive

            if os.isatty(0):
                write(b"[pyhv] " + HELP.split("] ", 1)[1].split("\r\n")[0].encode() + b"\r\n")
            end = interactive(vm, 0, write)  # type: ignore[arg-type]
        else:
            from pyhv.worker.script import ScriptError, run_script

            try:
                end = run_script(vm, lines, timeout=timeout)  # type: ignore[arg-type]
            except ScriptError as e:
                raise _fail(str(e)) from None
    finally:
        vm.close()  # type: ignore[attr-defined]
    _report(end)


@cli.command()
@click.option("--memory", "-m", default="512M", show_default=True, help="guest RAM")
@click.option(
    "--image", type=click.Path(dir_okay=False), help="guest image (default: the bundled one)"
)
def demo(memory: str, image: str | None) -> None:
    """A short scripted session with the guest's shell, narrated."""
    config = _config(memory, 1, "", image)
    tty = os.isatty(1)
    write = _writer(1, tty)
    pending = iter(n for n, _ in DEMO)

    def narrate(command: str) -> None:
        # Called at a prompt: an empty command makes the guest print a fresh prompt below the
        # narration, so each command appears right under what it shows.
        if command:
            return
        text = f"\n# {next(pending)}"
        write((click.style(text, fg="cyan", bold=True) if tty else text).encode())

    from pyhv.worker.script import ScriptError, run_script

    click.echo(
        f"pyhv demo: a {config.memory >> 20} MiB VM with one VP boots the reference guest by "
        "direct boot; its serial console follows. (measured on PVM: guest kernel code is "
        "emulated here, so commands take a moment)"
    )
    vm = _start(config, write, False)
    try:
        try:
            steps = [x for _, c in DEMO for x in ("", c)]
            end = run_script(vm, steps, before=narrate)  # type: ignore[arg-type]
        except ScriptError as e:
            raise _fail(str(e)) from None
    finally:
        vm.close()  # type: ignore[attr-defined]
    _report(end)


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="pyhv")


if __name__ == "__main__":
    main(sys.argv[1:])
