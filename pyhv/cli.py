"""The `pyhv` command line (click). `pyhv run` with plain options takes a fast path that does
not import click, and every heavy module is imported inside the command that needs it: the
time from process start to the guest's first serial byte is mostly the guest's own."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

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

RUN_HELP = """Boot the guest with its serial console on this terminal.

Interactive keys: Ctrl-A x quits, Ctrl-A h shows help. With --script or --command the
commands are typed at the shell prompt one by one and pyhv exits with the guest's
power-off status (3 if the guest triple-faults, 4 on an emulation error).
"""


class CliError(Exception):
    """A clear message and a non-zero exit, never a traceback."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- the commands, without click ---------------------------------------------------------


def _config(memory: str, vps: int, cmdline: str, image: str | None, **dynamic: Any) -> VmConfig:
    from pyhv.worker.config import ConfigError, VmConfig, parse_size

    try:
        parse_size(memory)  # a bad size is reported before anything else
        for v in dynamic.values():
            if isinstance(v, str):
                parse_size(v)
        if not os.access("/dev/kvm", os.R_OK | os.W_OK):
            raise CliError(
                "/dev/kvm is missing or not accessible: pyhv runs guests under Linux KVM; load "
                "the kvm module or run where /dev/kvm exists (and join the kvm group)"
            )
        if image is None:
            image = str(_bundled_image())
        return VmConfig.create(image=image, memory=memory, vps=vps, cmdline=cmdline, **dynamic)
    except ConfigError as e:
        raise CliError(str(e), 2) from None


def _bundled_image() -> object:
    try:
        from pyhv.guest_image import image_path
    except ImportError as e:
        raise CliError(f"the bundled guest is not available ({e}): pass --image FILE") from None
    try:
        return image_path()
    except Exception as e:  # noqa: BLE001 - the builder says what is missing (gcc, sources)
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


def run_vm(
    *,
    memory: str = "512M",
    vps: int = 1,
    cmdline: str = "",
    script: str | None = None,
    commands: tuple[str, ...] = (),
    image: str | None = None,
    process: bool = False,
    timeout: float = 300.0,
    dynamic_memory: bool = False,
    startup: str | None = None,
    minimum: str | None = None,
    maximum: str | None = None,
    control: str | None = None,
) -> int:
    """`pyhv run`: returns the process exit code; raises CliError for a clear failure."""
    dm = {"startup": startup, "minimum": minimum, "maximum": maximum}
    config = _config(
        memory,
        vps,
        cmdline,
        image,
        dynamic_memory=dynamic_memory,
        **{k: v for k, v in dm.items() if v is not None},
    )
    lines: list[str] | None = None
    if script is not None or commands:
        from pyhv.worker.script import script_lines

        lines = script_lines(script) if script is not None else []
        for c in commands:
            lines += script_lines(c.replace(";", "\n"))
    write = _writer(1, os.isatty(1))
    vm = _start(config, write, process)
    server = None
    try:
        if control is not None:
            from pyhv.worker.control import ControlError, ControlServer

            try:
                server = ControlServer(control, vm)
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
                end = run_script(vm, lines, timeout=timeout)
            except ScriptError as e:
                raise CliError(str(e)) from None
    finally:
        if server is not None:
            server.close()
        vm.close()
    return _report(end)


def _mib(pages: object) -> str:
    return f"{int(pages) * 4096 / (1 << 20):g} MiB" if isinstance(pages, int) else "-"


def format_memory_status(st: dict[str, Any], now: float | None = None) -> str:
    """What `pyhv memory` prints: the VM's memory and the guest's last status report."""
    import time

    lines = [
        f"dynamic memory: {st.get('state')} (protocol {st.get('protocol') or '-'})",
        f"assigned: {_mib(st.get('assigned_pages'))}",
        f"visible: {_mib(st.get('visible_pages'))}",
        f"ballooned: {_mib(st.get('ballooned_pages'))}",
        f"hot-added: {_mib(st.get('hot_added_pages'))}",
        f"range: {_mib(st.get('minimum_pages'))} .. {_mib(st.get('maximum_pages'))}",
    ]
    last = st.get("last_status")
    if isinstance(last, dict):
        age = (now or time.time()) - float(last.get("time", 0))
        pressure = last.get("pressure")
        lines.append(
            f"last status report: committed {_mib(last.get('committed_pages'))}, available "
            f"{_mib(last.get('available_pages'))}, pressure "
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


def memory_cmd(*, control: str, target: str | None = None) -> int:
    """`pyhv memory`: show a running VM's memory; with a target, move it there."""
    from pyhv.worker.config import ConfigError, format_size, parse_size
    from pyhv.worker.control import ControlError, request

    msg: dict[str, object] = {"op": "status"}
    if target is not None:
        try:
            msg = {"op": "target", "bytes": parse_size(target)}
        except ConfigError as e:
            raise CliError(f"--target: {e}", 2) from None
    try:
        reply = request(control, msg)
    except ControlError as e:
        raise CliError(str(e)) from None
    if not reply.get("ok"):
        raise CliError(str(reply.get("error", "the VM refused the request")))
    plan = reply.get("plan")
    if isinstance(plan, dict):
        goal = int(plan.get("goal_pages", 0)) * 4096
        note = " (clamped to the VM's minimum/maximum)" if plan.get("clamped") else ""
        print(f"target: {format_size(goal)}{note}")
    status = reply.get("status")
    if isinstance(status, dict):
        print(format_memory_status(status))
    return 0


def demo_vm(*, memory: str = "512M", image: str | None = None) -> int:
    """`pyhv demo`: a short scripted session with the guest's shell, narrated."""
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


# --- the fast path for `pyhv run` --------------------------------------------------------

_RUN_VALUES = {
    "--memory": "memory",
    "-m": "memory",
    "--vps": "vps",
    "--cmdline": "cmdline",
    "--script": "script",
    "--command": "commands",
    "-c": "commands",
    "--image": "image",
    "--timeout": "timeout",
    "--startup": "startup",
    "--minimum": "minimum",
    "--maximum": "maximum",
    "--control": "control",
}


def _parse_run_fast(args: list[str]) -> dict[str, Any] | None:
    """Options of `pyhv run` when they are all plain; None sends the arguments to click,
    which explains anything unusual (help, unknown options, bad numbers)."""
    opts: dict[str, Any] = {}
    commands: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--process", "--dynamic-memory"):
            opts[arg[2:].replace("-", "_")] = True
            i += 1
            continue
        name, eq, value = arg.partition("=")
        key = _RUN_VALUES.get(name)
        if key is None or (eq and not name.startswith("--")):
            return None
        if not eq:
            if i + 1 >= len(args):
                return None
            value = args[i + 1]
            i += 1
        i += 1
        try:
            if key == "commands":
                commands.append(value)
            elif key == "vps":
                opts[key] = int(value)
            elif key == "timeout":
                opts[key] = float(value)
            elif key == "script":
                with open(value) as f:
                    opts[key] = f.read()
            else:
                opts[key] = value
        except (OSError, ValueError, UnicodeDecodeError):
            return None
    opts["commands"] = tuple(commands)
    return opts


# --- click ---------------------------------------------------------------------------------

_click_cli: Any = None


def _build_click() -> Any:
    import click

    def call(fn: Callable[..., int], **kw: Any) -> NoReturn:
        try:
            code = fn(**kw)
        except CliError as e:
            err = click.ClickException(str(e))
            err.exit_code = e.code  # type: ignore[misc]
            raise err from None
        raise SystemExit(code)

    @click.group(context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(package_name="pyhv")
    def group() -> None:
        """pyhv: the Hyper-V stack of Windows Internals on Linux KVM."""

    @group.command(help=RUN_HELP)
    @click.option("--memory", "-m", default="512M", show_default=True, help="guest RAM (K/M/G)")
    @click.option("--vps", default=1, show_default=True, type=int, help="virtual processors")
    @click.option("--cmdline", default="", help="guest kernel command line")
    @click.option("--script", type=click.File("r"), help="run the shell commands in FILE")
    @click.option("--command", "-c", "commands", multiple=True, help="a shell command (repeatable)")
    @click.option("--image", type=click.Path(dir_okay=False), help="guest image (default: bundled)")
    @click.option("--process", is_flag=True, help="run the VM in its own worker process")
    @click.option("--timeout", default=300.0, show_default=True, help="seconds to wait per prompt")
    @click.option("--dynamic-memory", is_flag=True, help="Dynamic Memory (balloon, hot-add)")
    @click.option("--startup", help="Dynamic Memory startup RAM (same as --memory)")
    @click.option("--minimum", help="Dynamic Memory minimum RAM (default: startup)")
    @click.option("--maximum", help="Dynamic Memory maximum RAM (default: startup)")
    @click.option("--control", metavar="PATH", help="serve a control socket (pyhv memory)")
    def run(script: Any, **kw: Any) -> None:
        text = None
        if script is not None:
            try:
                text = script.read()
            except UnicodeDecodeError as e:
                raise click.BadParameter(f"{script.name} is not UTF-8 text: {e}") from None
        call(run_vm, script=text, **kw)

    @group.command()
    @click.option("--control", metavar="PATH", required=True, help="the VM's control socket")
    @click.option("--target", help="move the VM's memory to SIZE (e.g. 768M)")
    def memory(**kw: Any) -> None:
        """Show a running VM's memory (assigned, visible, ballooned, the guest's last status
        report); with --target, balloon or add memory towards SIZE."""
        call(memory_cmd, **kw)

    @group.command()
    @click.option("--memory", "-m", default="512M", show_default=True, help="guest RAM")
    @click.option("--image", type=click.Path(dir_okay=False), help="guest image (default: bundled)")
    def demo(**kw: Any) -> None:
        """A short scripted session with the guest's shell, narrated."""
        call(demo_vm, **kw)

    from pyhv.experiments.cli import experiment_group  # the book's experiments
    from pyhv.migration.cli import migrate_group  # live migration (until `pyhv vm migrate`)
    from pyhv.vmms.cli import counters_command, vm_group, vmms_group  # the VMMS and its client

    for command in (vm_group, vmms_group, counters_command, experiment_group, migrate_group):
        group.add_command(command)
    return group


def __getattr__(name: str) -> Any:
    """`pyhv.cli.cli` is the click group, built on first use."""
    global _click_cli
    if name == "cli":
        if _click_cli is None:
            _click_cli = _build_click()
        return _click_cli
    raise AttributeError(f"module 'pyhv.cli' has no attribute {name!r}")


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["run"]:
        opts = _parse_run_fast(args[1:])
        if opts is not None:
            try:
                code = run_vm(**opts)
            except CliError as e:
                sys.stderr.write(f"Error: {e}\n")
                code = e.code
            except KeyboardInterrupt:
                code = 130
            sys.exit(code)
    __getattr__("cli").main(args=args, prog_name="pyhv")


if __name__ == "__main__":
    main()
