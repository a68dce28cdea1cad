"""`pyhv run` and `pyhv demo`: the guest's console on a terminal, scripted sessions, and clear
messages (never a traceback) when something is wrong."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from pyhv.cli import run as run_module
from pyhv.cli import run_cli
from tests.guests.build import build_test_guest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def pyhv(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyhv.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def invoke(*args: str) -> tuple[int, str]:
    """`pyhv ARGS` in this process: its exit status and everything it printed."""
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = run_cli(list(args))
        except SystemExit as e:  # argparse's usage errors and --help
            code = e.code if isinstance(e.code, int) else 1
    assert "Traceback" not in out.getvalue()
    return code, out.getvalue()


@pytest.mark.parametrize("size", ["12X", "lots", "-5M", "1.5.0G", "M", "4096iB"])
def test_a_bad_memory_size_is_refused_with_a_clear_message(size: str) -> None:
    code, out = invoke("run", f"--memory={size}", "--image", __file__)
    assert code == 2
    assert f"memory size '{size}' is not understood" in out
    assert "512M, 2G, 1.5GiB" in out  # the forms it takes


@pytest.mark.unit
def test_a_size_that_is_not_a_whole_number_of_bytes_is_refused_with_what_to_round_to() -> None:
    code, out = invoke("run", "--memory", "0.3K", "--image", __file__)
    assert code == 2 and "'0.3K' is not a whole number of bytes: round it (for example 307" in out


@pytest.mark.unit
@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("1.5GiB", 1536 << 20),
        ("1.5G", 1536 << 20),
        ("4096", 4096),
        ("4096B", 4096),
        ("64kb", 64 << 10),
        (" 768 MiB ", 768 << 20),
        ("1T", 1 << 40),
    ],
)
def test_one_size_parser_reads_units_and_bytes_and_the_formatter_prints_them_back(
    text: str, size: int
) -> None:
    from pyhv.sizes import format_size, parse_size

    assert parse_size(text) == size
    assert parse_size(format_size(size)) == size


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["vm", "create", "x", "--memory", "lots"], "memory size 'lots' is not understood"),
        (["vm", "memory", "x", "--target", "9Q"], "memory size '9Q' is not understood"),
        (["vm", "--tcp", "localhost", "list"], "'localhost' is not HOST:PORT"),
        (["vm", "migrate", "x", "--to", "nowhere"], "'nowhere' is not HOST:PORT"),
        (["vmms", "serve", "--memory-budget", "lots"], "memory size 'lots' is not understood"),
        (["memory", "--control", "/x", "--target", "12 parsecs"], "'12 parsecs' is not understood"),
        (["migrate", "demo", "--bandwidth", "fast"], "memory size 'fast' is not understood"),
        (["counters", "--interval", "0"], "must be > 0"),
        (["experiment", "contention", "--time-scale", "-1"], "must be > 0"),
        (["run", "--timeout", "soon"], "'soon' is not a number"),
        (["vm", "frobnicate"], "invalid choice: 'frobnicate'"),
        (["vm", "start"], "the following arguments are required: NAME"),
    ],
)
def test_bad_input_to_any_command_gets_its_usage_error_and_status_2(
    args: list[str], words: str
) -> None:
    code, out = invoke(*args)
    assert code == 2 and words in out, out


@pytest.mark.unit
def test_acting_on_a_vm_without_a_vmms_says_how_to_start_one(tmp_path: Path) -> None:
    code, out = invoke("vm", "--state-dir", str(tmp_path), "show", "nosuchvm")
    assert code == 1
    assert "no VMMS is serving on" in out and "pyhv vmms serve" in out


@pytest.mark.unit
def test_the_control_socket_and_worker_migration_commands_say_when_pyhv_vm_is_the_way() -> None:
    assert "use `pyhv vm memory NAME` instead" in " ".join(invoke("memory", "--help")[1].split())
    assert "use `pyhv vm migrate NAME --to HOST:PORT` instead" in " ".join(
        invoke("migrate", "--help")[1].split()
    )


@pytest.fixture
def kvm_check_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """`pyhv run` checks /dev/kvm before the values below: let it pass where KVM is missing."""
    real = os.access
    monkeypatch.setattr(
        run_module.os, "access", lambda p, m: True if p == "/dev/kvm" else real(p, m)
    )


@pytest.mark.parametrize(
    ("size", "words"), [("1M", "out of range"), ("100G", "out of range"), ("1000K", "whole number")]
)
@pytest.mark.usefixtures("kvm_check_passes")
def test_a_memory_size_outside_what_a_vm_can_have_is_refused(size: str, words: str) -> None:
    code, out = invoke("run", "--memory", size, "--image", __file__)
    assert code == 2 and words in out


@pytest.mark.usefixtures("kvm_check_passes")
def test_a_bad_vp_count_is_refused() -> None:
    code, out = invoke("run", "--vps", "0", "--image", __file__)
    assert code == 2 and "VP count 0 is out of range" in out


def test_a_script_that_is_not_text_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "session.bin"
    script.write_bytes(b"\xff\xfe\x00mem")
    code, out = invoke("run", "--script", str(script), "--image", __file__)
    assert code == 2 and "is not UTF-8 text" in out


@pytest.mark.usefixtures("kvm_check_passes")
def test_a_missing_image_is_named_in_the_message() -> None:
    code, out = invoke("run", "--image", "/nonexistent/guest.elf")
    assert code != 0 and "'/nonexistent/guest.elf' does not exist" in out


def test_without_dev_kvm_pyhv_run_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.access
    monkeypatch.setattr(
        run_module.os, "access", lambda p, m: False if p == "/dev/kvm" else real(p, m)
    )
    code, out = invoke("run", "--command", "mem")
    assert code == 1 and "/dev/kvm is missing" in out


def test_without_gcc_the_guest_image_error_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyhv.guest_image as gi

    def no_gcc() -> Path:
        raise gi.GuestBuildError("gcc was not found: install gcc to build the guest")

    monkeypatch.setattr(run_module.os, "access", lambda p, m: True)
    monkeypatch.setattr(gi, "image_path", no_gcc)
    code, out = invoke("run", "--command", "mem")
    assert code == 1 and "cannot build the guest image: gcc was not found" in out


@pytest.mark.kvm
def test_a_file_that_is_not_a_guest_image_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an ELF\n")
    code, out = invoke("run", "--image", str(bad), "--command", "mem")
    assert code == 1 and "is not an ELF file" in out


def test_the_console_escape_keys_are_decoded_like_qemus() -> None:
    from pyhv.worker.terminal import EscapeDecoder

    d = EscapeDecoder()
    assert d.feed(b"ls\r") == (b"ls\r", [])
    assert d.feed(b"a\x01") == (b"a", [])  # Ctrl-A waits for the next key
    assert d.feed(b"h") == (b"", ["help"])
    assert d.feed(b"\x01\x01\x01x") == (b"\x01", ["quit"])
    assert d.feed(b"\x01zq") == (b"q", [])  # unknown escapes are dropped


@pytest.mark.guest
def test_pyhv_run_with_commands_echoes_the_session_and_exits_with_the_poweroff_status() -> None:
    r = pyhv("run", "--memory", "256M", "--command", "mem", "--command", "poweroff 9")
    assert r.returncode == 9, r.stderr
    assert "pyhv> mem\n" in r.stdout and "visible: 256 MiB" in r.stdout
    assert "guest powered off with status 9" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.guest
def test_pyhv_run_with_a_script_file_runs_each_line_after_the_prompt(tmp_path: Path) -> None:
    script = tmp_path / "session.txt"
    script.write_text("# a comment\nticks\n\nmem\npoweroff\n")
    r = pyhv("run", "--script", str(script), "--process")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("pyhv> ") == 3
    assert "ticks: " in r.stdout and "powering off" in r.stdout


@pytest.mark.guest
def test_a_guest_that_faults_is_reported_with_registers_and_a_nonzero_exit(tmp_path: Path) -> None:
    image = build_test_guest("triple_fault_gp", tmp_path)
    r = pyhv("run", "--image", str(image), "--command", "mem")
    assert r.returncode == 3
    assert "triple-faulted on VP 0" in r.stderr and "RBX=000000007e57fa17" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.guest
def test_pyhv_demo_runs_its_narrated_session() -> None:
    r = pyhv("demo")
    assert r.returncode == 0, r.stderr
    assert "# testlimit commits 64 MiB" in r.stdout
    assert "pyhv> kill" in r.stdout and "guest powered off with status 0" in r.stderr


@pytest.mark.guest
def test_the_interactive_console_runs_in_raw_mode_and_ctrl_a_x_quits() -> None:
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyhv.cli", "run", "--memory", "128M"],
        stdin=child,
        stdout=child,
        stderr=child,
        cwd=ROOT,
        close_fds=True,
    )
    os.close(child)
    seen = bytearray()

    def read_until(marker: bytes, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while marker not in seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{marker!r} not seen in {bytes(seen)!r}"
            if select.select([main], [], [], left)[0]:
                seen.extend(os.read(main, 4096))

    try:
        read_until(b"pyhv> ")
        os.write(main, b"mem\r")
        read_until(b"visible: 128 MiB")
        os.write(main, b"\x01h")
        read_until(b"Ctrl-A x")
        os.write(main, b"\x01x")
        assert proc.wait(30) == 0
        read_until(b"VM stopped (Ctrl-A x)")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(main)


@pytest.mark.unit
def test_the_boot_path_of_pyhv_run_and_the_worker_process_import_no_heavy_library() -> None:
    # msgspec: ~8 ms to import, so only where worker messages cross (pyhv.worker.messages).
    heavy = ("click", "numpy", "matplotlib", "prometheus_client", "zstandard", "xxhash", "msgspec")
    code = (
        "import sys\n"
        "from pyhv.cli import parser\n"
        "parser().parse_args(['run', '-m', '1G', '-c', 'mem'])\n"
        "import pyhv.worker.vm, pyhv.worker.server, pyhv.guest_image, pyhv.hypervisor\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.unit
def test_a_bad_vp_count_is_explained_by_the_parser() -> None:
    code, out = invoke("run", "--vps", "two")
    assert code == 2 and "invalid int value: 'two'" in out


@pytest.mark.unit
@pytest.mark.parametrize("argv", [[], ["--fd"], ["--fd", "seven"], ["--fd", "3", "--verbose"]])
def test_the_worker_process_refuses_an_argv_it_does_not_know_with_its_usage(
    argv: list[str],
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "pyhv.worker", *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2
    assert (
        r.stderr.startswith("usage: python -m pyhv.worker --fd N") and "Traceback" not in r.stderr
    )
