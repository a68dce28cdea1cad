"""The VP run loop in C (``_runloop.c`` next to this file), built at first use.

`load()` returns the compiled module, building it with the machine's C compiler (``$CC`` or
``gcc``) and the running Python's headers the first time, into ``$PYHV_CACHE`` (default
``~/.cache/pyhv``) under a name that changes with the source and the Python build, so a build is
reused by every later process. When it cannot be built or loaded (no compiler, no Python headers,
``PYHV_NO_FASTRUN=1`` in the environment), `load()` returns None, says why once in the log, and
the hypervisor runs its VPs with the same loop written in Python (pyhv.hypervisor.runloop).
The C loop reads and writes only the structures declared in pyhv.kvm.loopabi.

``python -m pyhv.kvm.fastrun`` builds it and prints where it is (or why it could not).
"""

from __future__ import annotations

# Only cheap imports here: load() is on the boot path (`pyhv run` starts its first VP); what
# only a build needs is imported by build().
import importlib.machinery
import logging
import os
import sys
import threading
import zlib
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "_runloop.c"
MODULE = "pyhv.kvm._runloop"
DISABLE_ENV = "PYHV_NO_FASTRUN"

_lock = threading.Lock()
_module: ModuleType | None = None
_why_not: str | None = None  # set once load() failed or was disabled


class FastRunUnavailable(RuntimeError):
    """The C run loop could not be built or loaded; the message says why."""


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0")


def _cache_dir() -> Path:
    return Path(os.environ.get("PYHV_CACHE") or Path.home() / ".cache" / "pyhv")


def _compiler() -> list[str]:
    import shutil

    cc = os.environ.get("CC", "").split() or ["gcc"]
    if shutil.which(cc[0]) is None:
        raise FastRunUnavailable(f"no C compiler: {cc[0]!r} not found on PATH")
    return cc


def module_path() -> Path:
    """Where the built module is (or will be) for this source and this Python: the name holds
    a checksum of the source and of the Python build (version, ABI suffix)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    key = zlib.crc32(f"{sys.version}\0{sys.executable}\0{suffix}".encode())
    key = zlib.crc32(SOURCE.read_bytes(), key)
    size = SOURCE.stat().st_size
    return _cache_dir() / f"runloop-{key:08x}-{size}" / f"_runloop{suffix}"


def build(force: bool = False) -> Path:
    """Compile _runloop.c unless an up-to-date build exists; returns the module's path."""
    out = module_path()
    if out.is_file() and not force:
        return out
    import subprocess
    import sysconfig
    import tempfile

    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        raise FastRunUnavailable(
            f"Python headers not found ({include}/Python.h): install the Python development "
            "package (Debian/Ubuntu: python3-dev)"
        )
    cc = _compiler()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FastRunUnavailable(
            f"cannot create {out.parent}: {e.strerror}; set PYHV_CACHE to a writable directory"
        ) from None
    # build under a private name, then rename: parallel processes never load a partial file
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [*cc, "-O2", "-shared", "-fPIC", "-fno-strict-aliasing", f"-I{include}"]
    cmd += ["-o", tmp, str(SOURCE)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip()[-2000:]
            raise FastRunUnavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{tail}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _import(path: Path) -> ModuleType:
    import importlib.util

    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    if spec is None:
        raise FastRunUnavailable(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def _tsc_is_clocksource() -> bool:
    """The kernel keeps time by the TSC (so it runs at a constant rate, in sync on all CPUs):
    the C loop may time handlers by it."""
    try:
        with open("/sys/devices/system/clocksource/clocksource0/current_clocksource") as f:
            return f.read().strip() == "tsc"
    except OSError:
        return False


def load() -> ModuleType | None:
    """The C run loop module, or None (the reason logged once) if it cannot be had."""
    global _module, _why_not
    if _module is not None or _why_not is not None:
        return _module
    with _lock:
        if _module is not None or _why_not is not None:
            return _module
        if disabled():
            _why_not = f"{DISABLE_ENV} is set"
            log.info("C run loop disabled (%s): VPs run the Python loop", _why_not)
            return None
        try:
            mod = _import(build())
            mod.set_tsc(_tsc_is_clocksource())
            _module = mod
        except (FastRunUnavailable, OSError, ImportError) as e:
            _why_not = str(e)
            log.warning("C run loop unavailable, VPs run the slower Python loop: %s", e)
        return _module


def why_unavailable() -> str | None:
    """Why load() returned None (None if it has not been tried or succeeded)."""
    return _why_not


def main() -> int:
    try:
        print(build(force="--force" in sys.argv[1:]))
    except FastRunUnavailable as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
