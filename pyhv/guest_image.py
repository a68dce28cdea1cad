"""The reference guest's image: find it, and build it from guest/ with the machine's gcc when it
is missing or its sources changed.

``image_path()`` returns ``guest/build/pyhv-guest.elf``, building it first if needed. When the
source tree is read-only, the image is built into ``$PYHV_CACHE`` (default ``~/.cache/pyhv``)
instead, in a directory named after the sources' hash. ``python -m pyhv.guest_image build``
does the same from the command line.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

# hashlib, subprocess, shutil and argparse are imported where they are used: `pyhv run` comes
# here on every boot, and an image newer than its sources needs none of them.

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
IMAGE_NAME = "pyhv-guest.elf"
_STAMP = ".source-hash"
_SOURCE_SUFFIXES = {".c", ".h", ".S", ".ld", ".sh"}
_TOOLS = ("gcc", "make", "ld", "objdump")


class GuestBuildError(RuntimeError):
    """The guest image could not be built; the message says what is missing or failed."""


def source_files(guest_dir: Path = GUEST_DIR) -> list[Path]:
    """Everything the image is built from, in a stable order."""
    if not (guest_dir / "Makefile").is_file():
        raise GuestBuildError(
            f"guest sources not found at {guest_dir}: pyhv's guest/ directory is needed to build "
            "the image (install pyhv from a source checkout, or pass an image file explicitly)"
        )
    files = [
        p
        for p in guest_dir.iterdir()
        if p.is_file() and (p.suffix in _SOURCE_SUFFIXES or p.name == "Makefile")
    ]
    return sorted(files, key=lambda p: p.name)


def source_hash(guest_dir: Path = GUEST_DIR) -> str:
    """A hash over the names and contents of the guest's sources."""
    import hashlib

    h = hashlib.sha256()
    for p in source_files(guest_dir):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _writable_dir(d: Path) -> bool:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(d, os.W_OK | os.X_OK)


def build_dir(guest_dir: Path = GUEST_DIR, digest: str | None = None) -> Path:
    """Where the image is built: guest/build, or a per-hash cache directory if that is read-only."""
    local = guest_dir / "build"
    if _writable_dir(local):
        return local
    cache = Path(os.environ.get("PYHV_CACHE") or Path.home() / ".cache" / "pyhv")
    d = cache / f"guest-{digest or source_hash(guest_dir)}"
    if not _writable_dir(d):
        raise GuestBuildError(
            f"neither {local} nor {d} is writable: set PYHV_CACHE to a writable directory"
        )
    return d


def _check_tools() -> None:
    import shutil

    missing = [t for t in _TOOLS if shutil.which(t) is None]
    if missing:
        raise GuestBuildError(
            f"cannot build the guest image: {', '.join(missing)} not found on PATH; install them "
            "(Debian/Ubuntu: apt-get install gcc make binutils)"
        )


def _fresh(guest_dir: Path) -> Path | None:
    """guest/build's image if every source is older than its stamp: no hash needed then. The
    stamp's time is set to a second before the hash it records was taken, so a source written
    during a build, or within a coarse file-system clock tick, is hashed again."""
    local = guest_dir / "build"
    image, stamp = local / IMAGE_NAME, local / _STAMP
    try:
        built = stamp.stat().st_mtime
        if not image.is_file():
            return None
        newest = max(p.stat().st_mtime for p in source_files(guest_dir))
    except (OSError, GuestBuildError, ValueError):
        return None
    return image if newest < built else None


def build(guest_dir: Path = GUEST_DIR, *, force: bool = False) -> Path:
    """Build the image if it is missing or older than its sources; returns its path."""
    if not force and (image := _fresh(guest_dir)) is not None:
        return image
    import subprocess
    import time

    hashed = time.time() - 1.0  # the stamp's time: sources written after this are hashed again
    digest = source_hash(guest_dir)
    out_dir = build_dir(guest_dir, digest)
    image = out_dir / IMAGE_NAME
    stamp = out_dir / _STAMP
    with open(out_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time (parallel tests, several helpers)
        if not force and image.is_file() and stamp.is_file() and stamp.read_text() == digest:
            os.utime(stamp, (hashed, hashed))  # touched, not changed: no hash next time
            return image
        _check_tools()
        stamp.unlink(missing_ok=True)
        cmd = ["make", "-s", "-B", "-f", str(guest_dir / "Makefile"), f"BUILD={out_dir}"]
        r = subprocess.run(cmd, cwd=out_dir, capture_output=True, text=True)
        if r.returncode != 0 or not image.is_file():
            tail = (r.stdout + r.stderr).strip()[-3000:]
            raise GuestBuildError(f"building the guest image failed ({' '.join(cmd)}):\n{tail}")
        stamp.write_text(digest)
        os.utime(stamp, (hashed, hashed))
    return image


def image_path() -> Path:
    """The guest image, built on first use and rebuilt when a source changes."""
    return build()


def check_instructions(elf: Path, guest_dir: Path = GUEST_DIR) -> None:
    """Raise GuestBuildError listing any instruction the CPL0 emulator here rejects."""
    import subprocess

    r = subprocess.run(
        ["sh", str(guest_dir / "check-insns.sh"), str(elf)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise GuestBuildError(r.stderr.strip() or f"check-insns.sh failed on {elf}")


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m pyhv.guest_image", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest image (if needed) and print its path")
    b.add_argument("--force", action="store_true", help="rebuild even if it is up to date")
    sub.add_parser("path", help="print where the image is (or will be) built")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "build":
            print(build(force=args.force))
        else:
            print(build_dir() / IMAGE_NAME)
    except GuestBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
