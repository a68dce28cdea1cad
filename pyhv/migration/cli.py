"""`pyhv migrate`: live migration from the command line between worker processes
(`pyhv vm migrate` does it between two VMMS instances).

pyhv migrate demo [--memory 256M] [--dirty MB] ...     both hosts here, on loopback
pyhv migrate listen --listen 10.200.1.2:7777 --token-file F   a destination host
pyhv migrate run --to 10.200.1.2:7777 --token-file F [-c "dirty 16"]   boot, then migrate
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from pyhv.migration.stream import MigrationError


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


def _token(token: str | None, token_file: str | None) -> str:
    if token_file:
        with open(token_file) as f:
            token = f.read().strip()
    if not token:
        raise click.UsageError("give the shared migration token: --token-file FILE or --token T")
    return token


class ProgressBar:
    """One status line redrawn in place: pass, a bar of the pass-1 copy, bytes, dirty rate,
    bandwidth and the downtime the final pass would take now."""

    WIDTH = 24

    def __init__(self, out: Any = None) -> None:
        self.out = out or sys.stderr
        self.tty = self.out.isatty()

    def __call__(self, p: dict[str, Any]) -> None:
        total = max(p["ram_pages"] - p["skipped_pages"], 1)
        done = 1.0 if p["passes"] >= 1 else min((p["pages_sent"] + p["zero_pages"]) / total, 1.0)
        fill = int(done * self.WIDTH)
        bar = "#" * fill + "." * (self.WIDTH - fill)
        line = (
            f"{p['phase']:>9} [{bar}] sent {p['bytes_sent'] / 2**20:7.1f} MiB"
            f"  pages {p['pages_sent']}  zero {p['zero_pages']}"
            f"  dirty {p['dirty_pages']} ({p['dirty_rate'] / 1000:.1f}k/s)"
            f"  {p['bandwidth'] / 1e6:.0f} MB/s"
            f"  downtime ~{p['expected_downtime'] * 1000:.0f} ms"
            + (f"  throttle {p['throttle_percent']:.0f}%" if p["throttle_percent"] else "")
        )
        if self.tty:
            self.out.write("\r\x1b[K" + line)
        elif (
            p["phase"] in ("done", "aborted")
            or p["phase"].startswith("pass")
            or p["phase"] == "final"
        ):
            self.out.write(line + "\n")
        self.out.flush()

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


def _summary(r: dict[str, Any]) -> str:
    return (
        f"migrated in {r['total_time']:.3f} s, downtime {r['downtime'] * 1000:.1f} ms, "
        f"{r['passes']} passes, {r['pages_sent']} pages sent, {r['zero_pages']} zero pages, "
        f"{r['skipped_pages']} never-written pages skipped, {r['bytes_sent'] / 2**20:.1f} MiB "
        "on the wire"
    )


def _options(**kw: Any) -> dict[str, Any]:
    from pyhv.worker.config import parse_size

    out: dict[str, Any] = {
        "downtime_target": kw["downtime"] / 1000,
        "max_passes": kw["max_passes"],
        "compress": kw["compress"],
        "auto_converge": not kw["no_throttle"],
        "verify": not kw["no_verify"],
    }
    if kw["bandwidth"]:
        out["bandwidth"] = parse_size(kw["bandwidth"])
    return out


def _migration_options(f: Any) -> Any:
    for opt in reversed(
        [
            click.option("--downtime", default=300.0, show_default=True, help="target, ms"),
            click.option("--max-passes", default=10, show_default=True, help="as Hyper-V"),
            click.option("--bandwidth", help="limit, bytes/s with units (e.g. 100M)"),
            click.option("--compress", is_flag=True, help="zstd-compress page frames"),
            click.option("--no-throttle", is_flag=True, help="no auto-converge"),
            click.option("--no-verify", is_flag=True, help="skip the RAM checksum at pause"),
        ]
    ):
        f = opt(f)
    return f


@click.group("migrate")
def migrate_group() -> None:
    """Live migration: move a running VM to another host while it runs."""


@migrate_group.command("demo")
@click.option("--memory", "-m", default="256M", show_default=True, help="guest RAM")
@click.option("--dirty", type=int, default=16, show_default=True, help="MiB the guest rewrites")
@_migration_options
def demo(memory: str, dirty: int, **kw: Any) -> None:
    """Boot the guest in one worker process, start a destination worker, migrate on loopback
    with a progress bar, and show the guest going on at the destination."""
    import secrets

    from pyhv.guest_image import image_path
    from pyhv.migration.worker import IncomingWorker, migrate_worker
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    token = secrets.token_hex(16)
    src = WorkerProcess(VmConfig.create(image=image_path(), memory=memory))
    dst = IncomingWorker(token)
    try:
        src.start()
        src.serial.read_until(b"pyhv> ", 30)
        click.echo(f"source: worker {src.pid} runs a {memory} guest")
        if dirty:
            src.send(f"dirty {dirty}\r".encode())
            src.serial.read_until(b"pyhv> ", 30)
            click.echo(f"source: the guest rewrites {dirty} MiB in the background")
            time.sleep(1)
        dst.start()
        addr = dst.wait_listening()
        click.echo(f"destination: worker {dst.pid} listens on {addr[0]}:{addr[1]}")
        bar = ProgressBar()
        try:
            result = migrate_worker(src, addr, token, _options(**kw), on_progress=bar)
        finally:
            bar.finish()
        click.echo(_summary(result))
        dst.wait_migrated(30)
        for command in ("ticks", "tasks", "ticks"):
            dst.send(command.encode() + b"\r")
            out = dst.serial.read_until(b"pyhv> ", 30).decode(errors="replace")
            click.echo("destination: " + out.replace("\r", "").strip().replace("\n", " | "))
            time.sleep(0.5)
    except MigrationError as e:
        raise click.ClickException(str(e)) from None
    finally:
        dst.close()
        src.close()


def _echo_serial(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


@migrate_group.command("listen")
@click.option("--listen", "where", default="127.0.0.1:0", show_default=True, help="HOST:PORT")
@click.option("--token", help="the shared migration token")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--max-memory", help="refuse VMs larger than this (default: MemAvailable)")
@click.option("--timeout", default=600.0, show_default=True, help="seconds to wait for a source")
def listen(
    where: str, token: str | None, token_file: str | None, max_memory: str | None, timeout: float
) -> None:
    """Be a destination host: take one VM, then show its serial output until it ends."""
    from pyhv.migration.worker import IncomingWorker
    from pyhv.worker.config import parse_size

    dst = IncomingWorker(
        _token(token, token_file),
        _address(where),
        output=_echo_serial,
        max_memory=parse_size(max_memory) if max_memory else None,
        accept_timeout=timeout,
    )
    try:
        dst.start()
        host, port = dst.wait_listening()
        click.echo(f"listening on {host}:{port}", err=True)
        info = dst.wait_migrated(timeout + 60)
        if info is None:
            end = dst.wait(5)
            raise click.ClickException(end.describe() if end else "no VM arrived")
        click.echo(f"\nVM {info['config']['name']!r} arrived from {info['source']}", err=True)
        end = dst.wait()
        click.echo(f"\n{end.describe() if end else 'ended'}", err=True)
    except KeyboardInterrupt:
        pass
    finally:
        dst.close()


@migrate_group.command("run")
@click.option("--to", "to", required=True, help="the destination's HOST:PORT")
@click.option("--token", help="the shared migration token")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False))
@click.option("--memory", "-m", default="256M", show_default=True, help="guest RAM")
@click.option("--command", "-c", "commands", multiple=True, help="shell command before migrating")
@_migration_options
def run(
    to: str,
    token: str | None,
    token_file: str | None,
    memory: str,
    commands: tuple[str, ...],
    **kw: Any,
) -> None:
    """Boot the guest here, type COMMANDs, then migrate it to a `pyhv migrate listen` host."""
    from pyhv.guest_image import image_path
    from pyhv.migration.worker import migrate_worker
    from pyhv.worker import VmConfig
    from pyhv.worker.process import WorkerProcess

    secret = _token(token, token_file)
    src = WorkerProcess(VmConfig.create(image=image_path(), memory=memory))
    try:
        src.start()
        src.serial.read_until(b"pyhv> ", 30)
        for c in commands:
            src.send(c.encode() + b"\r")
            click.echo(src.serial.read_until(b"pyhv> ", 30).decode(errors="replace").strip())
        bar = ProgressBar()
        try:
            result = migrate_worker(src, _address(to), secret, _options(**kw), on_progress=bar)
        finally:
            bar.finish()
        click.echo(_summary(result))
    except MigrationError as e:
        raise click.ClickException(str(e)) from None
    finally:
        src.close()
