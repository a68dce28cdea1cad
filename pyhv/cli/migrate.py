"""`pyhv migrate`: live migration between two worker processes, without a VMMS (a demo on
loopback, and a destination host for a VM `pyhv migrate run` boots and sends). VMs the VMMS
keeps migrate with `pyhv vm migrate NAME --to HOST:PORT`; this module also holds the options
and the progress bar both share.

pyhv migrate demo [--memory 256M] [--dirty MB] ...     both hosts here, on loopback
pyhv migrate listen --listen 10.200.1.2:7777 --token-file F   a destination host
pyhv migrate run --to 10.200.1.2:7777 --token-file F [-c "dirty 16"]   boot, then migrate
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from pyhv.cli import args as types
from pyhv.cli.errors import CliError
from pyhv.sizes import format_size

RING_ENTRIES = 16384  #: the dirty ring of a VM `demo`/`run` boot for --dirty-limit (256 KiB a VP)

HELP = """Live migration between worker processes, without a VMMS: `demo` runs both ends here;
`listen` and `run` are two hosts' ends. For a VM the VMMS keeps, use
`pyhv vm migrate NAME --to HOST:PORT` instead."""


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
            + _vp_rates(p)
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


def _vp_rates(p: dict[str, Any]) -> str:
    """Each VP's dirty rate (a VM with the dirty ring) and the limit in force."""
    rates = p.get("vp_dirty_rates") or []
    if not rates:
        return ""
    text = "  vp " + "/".join(f"{r / 1000:.1f}k" for r in rates) + " pages/s"
    return text + (f" (limit {p['dirty_limit']})" if p.get("dirty_limit") else "")


def summary(r: dict[str, Any]) -> str:
    text = (
        f"migrated in {r['total_time']:.3f} s, downtime {r['downtime'] * 1000:.1f} ms, "
        f"{r['passes']} passes, {r['pages_sent']} pages sent, {r['zero_pages']} zero pages, "
        f"{r['skipped_pages']} never-written pages skipped, {r['bytes_sent'] / 2**20:.1f} MiB "
        "on the wire"
    )
    if r.get("vp_dirty_pages"):
        text += "; per VP: " + ", ".join(
            f"vp{i} dirtied {n} pages, slept {ms:.0f} ms"
            for i, (n, ms) in enumerate(
                zip(r["vp_dirty_pages"], r["vp_throttled_ms"], strict=False)
            )
        )
        if r.get("dirty_limit"):
            text += f" (limit {r['dirty_limit']} pages/s)"
    pc = r.get("postcopy")
    if pc:
        text += (
            f"; post-copy ({pc['switched_because']}): {pc['needed_pages']} pages after the "
            f"switch, {pc['requested_pages']} on demand, blocktime p50 "
            f"{pc['blocktime_p50_ms']:.2f} ms p99 {pc['blocktime_p99_ms']:.2f} ms"
        )
        if pc.get("urgent_channels"):
            text += f", {pc['urgent_channel_pages']} pages sent on the urgent channel"
        else:
            text += ", requests on the one link (no urgent channel)"
        if pc.get("recoveries"):
            text += f", the link cut and recovered {pc['recoveries']} time(s)"
    return text


def add_migration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--downtime", type=types.positive, default=300.0, help="target, ms (default 300)"
    )
    p.add_argument("--max-passes", type=int, default=10, help="as Hyper-V (default 10)")
    p.add_argument(
        "--bandwidth", type=types.size, metavar="SIZE", help="limit, bytes/s with units (e.g. 100M)"
    )
    p.add_argument("--compress", action="store_true", help="zstd-compress page frames")
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the stream (AES-256-GCM; frames are authenticated either way)",
    )
    p.add_argument(
        "--streams",
        type=int,
        default=1,
        choices=range(1, 17),
        metavar="N",
        help="TCP connections carrying pages, 1-16, a sending thread each (default 1)",
    )
    p.add_argument("--no-throttle", action="store_true", help="no auto-converge")
    p.add_argument(
        "--dirty-limit",
        type=_dirty_limit,
        metavar="PAGES|auto",
        help="pages/s each VP may dirty during the migration: a VP over it sleeps in its own "
        "thread, the others run on (QEMU's dirty-limit); 'auto': a share of the measured "
        "bandwidth once the passes stop shrinking. Replaces auto-converge; needs a VM with the "
        "dirty ring (`migrate demo/run` create it so)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the RAM checksum at pause")
    p.add_argument(
        "--postcopy",
        action="store_true",
        help="post-copy: run the VM at the destination at once and fetch its memory on demand "
        "(no pre-copy passes, a short pause whatever the guest writes). Until the last page "
        "is there the VM's memory is split between both hosts: a source that dies "
        "mid-post-copy loses the VM; a cut link does not if the source reconnects within "
        "--recover-timeout (the VPs that touch a missing page wait meanwhile). Only when "
        "asked for",
    )
    p.add_argument(
        "--postcopy-after",
        type=int,
        metavar="N",
        help="hybrid: pre-copy passes, then post-copy: from N passes on whenever the rest does "
        "not fit the downtime target or would pause the VM longer than a switch to post-copy "
        "(~5 ms), or as soon as a pass no longer shrinks a dirty set that does not fit "
        "(implies --postcopy, and its risk)",
    )
    p.add_argument(
        "--no-postcopy-preempt",
        action="store_true",
        help="post-copy: page requests share the one link, queued behind the background "
        "push, instead of an urgent channel of their own (a second connection: QEMU's "
        "postcopy-preempt, on by default)",
    )
    p.add_argument(
        "--recover-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="post-copy: seconds to try to reconnect to the destination when the link is cut "
        "after the VM runs there (default 60; 0: a cut link ends the migration and the VM)",
    )


def _dirty_limit(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 64:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the pages per second each VP may dirty (at least 64, e.g. 2000) "
            "or 'auto'"
        )
    return n


def migration_options(a: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "downtime_target": a.downtime / 1000,
        "max_passes": a.max_passes,
        "compress": a.compress,
        "encrypt": a.encrypt,
        "auto_converge": not a.no_throttle,
        "verify": not a.no_verify,
    }
    if a.streams != 1:
        out["streams"] = a.streams
    if a.dirty_limit is not None:
        out["dirty_limit"] = a.dirty_limit
    if a.bandwidth:
        out["bandwidth"] = a.bandwidth
    postcopy = a.postcopy or a.postcopy_after is not None
    if a.no_postcopy_preempt and not postcopy:
        raise CliError(
            "--no-postcopy-preempt without --postcopy: it only changes how post-copy sends "
            "the pages a VP waits for (add --postcopy or --postcopy-after N, or drop it)"
        )
    if postcopy:
        if a.postcopy_after is not None and a.postcopy_after < 1:
            raise CliError(
                f"--postcopy-after {a.postcopy_after}: give a number of passes >= 1 "
                "(or --postcopy alone for post-copy at once)"
            )
        if a.streams != 1:
            raise CliError(
                f"--postcopy with --streams {a.streams}: post-copy uses one connection "
                "(leave --streams out, or drop --postcopy)"
            )
        out["postcopy"] = True
        out["postcopy_after"] = a.postcopy_after or 0
        out["postcopy_preempt"] = not a.no_postcopy_preempt
        if not 0 <= a.recover_timeout <= 86400:  # nan too
            raise CliError(
                f"--recover-timeout {a.recover_timeout:g}: give seconds from 0 (no recovery) "
                "to 86400"
            )
        out["recover_timeout"] = a.recover_timeout
    return out


def _token_options(p: argparse.ArgumentParser) -> None:
    types.refuse_secret(p, "--token", "--token-file FILE or $PYHV_MIGRATION_TOKEN")
    p.add_argument(
        "--token-file",
        type=types.text_file,
        metavar="FILE",
        help="file holding the shared migration token (or $PYHV_MIGRATION_TOKEN)",
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "migrate", help="live migration between worker processes (no VMMS)", description=HELP
    )
    cmds = p.add_subparsers(dest="migrate_command", metavar="COMMAND", required=True)
    c = cmds.add_parser(
        "demo",
        help="both ends on loopback",
        description="Boot the guest in one worker process, start a destination worker, migrate on loopback with a progress bar, and show the guest going on at the destination.",
    )
    types.add_memory_option(c, "256M")
    c.add_argument("--dirty", type=int, default=16, help="MiB the guest rewrites (default 16)")
    add_migration_options(c)
    c.set_defaults(func=demo)
    c = cmds.add_parser(
        "listen",
        help="be a destination host",
        description="Be a destination host: take one VM, then show its serial output until it ends.",
    )
    c.add_argument(
        "--listen",
        dest="where",
        type=types.address,
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="where to listen (default 127.0.0.1:0)",
    )
    _token_options(c)
    c.add_argument(
        "--max-memory",
        type=types.size,
        metavar="SIZE",
        help="refuse VMs larger than this (default: MemAvailable)",
    )
    c.add_argument(
        "--recover-timeout",
        type=types.positive,
        default=60.0,
        metavar="S",
        help="post-copy: when the link to the source is cut after the VM runs here, wait this "
        "many seconds for the source to reconnect (the VM runs on, VPs touching a missing "
        "page wait); then stop the VM (default 60)",
    )
    types.add_timeout_option(c, 600.0, "for a source")
    c.set_defaults(func=listen)
    c = cmds.add_parser(
        "run",
        help="boot here, then migrate to a `migrate listen` host",
        description="Boot the guest here, type COMMANDs, then migrate it to a `pyhv migrate listen` host.",
    )
    c.add_argument(
        "--to", required=True, type=types.address, metavar="HOST:PORT", help="the destination"
    )
    _token_options(c)
    types.add_memory_option(c, "256M")
    c.add_argument(
        "--command",
        "-c",
        dest="commands",
        action="append",
        default=[],
        help="shell command before migrating (repeatable)",
    )
    add_migration_options(c)
    c.set_defaults(func=run)


def demo(a: argparse.Namespace) -> int:
    import secrets

    from pyhv.cli.run import vm_config
    from pyhv.migration.stream import MigrationError
    from pyhv.migration.worker import IncomingWorker, migrate_worker
    from pyhv.worker.process import WorkerProcess

    options = migration_options(a)  # a bad combination is refused before anything boots
    token = secrets.token_hex(16)
    src = WorkerProcess(vm_config(a.memory, **_ring(a)))
    dst = IncomingWorker(token)
    try:
        src.start()
        src.serial.read_until(b"pyhv> ", 30)
        print(f"source: worker {src.pid} runs a {format_size(a.memory)} guest", flush=True)
        if a.dirty:
            src.send(f"dirty {a.dirty}\r".encode())
            src.serial.read_until(b"pyhv> ", 30)
            print(f"source: the guest rewrites {a.dirty} MiB in the background", flush=True)
            time.sleep(1)
        dst.start()
        addr = dst.wait_listening()
        print(f"destination: worker {dst.pid} listens on {addr[0]}:{addr[1]}", flush=True)
        bar = ProgressBar()
        try:
            result = migrate_worker(src, addr, token, options, on_progress=bar)
        finally:
            bar.finish()
        print(summary(result), flush=True)
        dst.wait_migrated(30)
        for command in ("ticks", "tasks", "ticks"):
            dst.send(command.encode() + b"\r")
            out = dst.serial.read_until(b"pyhv> ", 30).decode(errors="replace")
            print("destination: " + out.replace("\r", "").strip().replace("\n", " | "), flush=True)
            time.sleep(0.5)
    except MigrationError as e:
        raise CliError(str(e)) from None
    finally:
        dst.close()
        src.close()
    return 0


def _ring(a: argparse.Namespace) -> dict[str, Any]:
    """The VM `demo`/`run` boots: with the dirty ring when a dirty limit is asked for."""
    return {"dirty_ring_entries": RING_ENTRIES} if a.dirty_limit is not None else {}


def _echo_serial(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def listen(a: argparse.Namespace) -> int:
    from pyhv.migration.stream import MigrationError
    from pyhv.migration.worker import IncomingWorker

    dst = IncomingWorker(
        types.token(a, "the shared migration token"),
        a.where,
        output=_echo_serial,
        max_memory=a.max_memory,
        accept_timeout=a.timeout,
        recover_timeout=a.recover_timeout,
    )
    try:
        dst.start()
        host, port = dst.wait_listening()
        print(f"listening on {host}:{port}", file=sys.stderr, flush=True)
        info = dst.wait_migrated(a.timeout + 60)
        if info is None:
            end = dst.wait(5)
            raise CliError(end.describe() if end else "no VM arrived")
        print(
            f"\nVM {info['config']['name']!r} arrived from {info['source']}",
            file=sys.stderr,
            flush=True,
        )
        end = dst.wait()
        print(f"\n{end.describe() if end else 'ended'}", file=sys.stderr, flush=True)
    except MigrationError as e:
        raise CliError(str(e)) from None
    except KeyboardInterrupt:
        pass
    finally:
        dst.close()
    return 0


def run(a: argparse.Namespace) -> int:
    from pyhv.cli.run import vm_config
    from pyhv.migration.stream import MigrationError
    from pyhv.migration.worker import migrate_worker
    from pyhv.worker.process import WorkerProcess

    options = migration_options(a)  # a bad combination is refused before anything boots
    secret = types.token(a, "the shared migration token")
    src = WorkerProcess(vm_config(a.memory, **_ring(a)))
    try:
        src.start()
        src.serial.read_until(b"pyhv> ", 30)
        for c in a.commands:
            src.send(c.encode() + b"\r")
            print(src.serial.read_until(b"pyhv> ", 30).decode(errors="replace").strip(), flush=True)
        bar = ProgressBar()
        try:
            result = migrate_worker(src, a.to, secret, options, on_progress=bar)
        finally:
            bar.finish()
        print(summary(result), flush=True)
    except MigrationError as e:
        raise CliError(str(e)) from None
    finally:
        src.close()
    return 0
