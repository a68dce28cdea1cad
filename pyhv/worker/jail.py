"""The jail a worker runs in, the way Firecracker's jailer builds one (docs/security.md).

A :class:`Jail` says what one worker gets; :func:`command` turns it into a bubblewrap
(``bwrap``) command line that starts the worker:

- a mount namespace whose root is an empty tmpfs holding only, read-only, the Python runtime
  (``/usr``), the venv and the pyhv package, the guest image and the runloop module; ``/dev``
  with the usual null/zero/urandom and ``/dev/kvm``; a ``/proc`` of its own pid namespace. No
  ``/etc``, no home, no VMMS state directory: not the API token, not ``vmms.sock``;
- a pid namespace of its own (the worker is its pid 1: it sees no other process), and IPC and
  UTS namespaces; a new, empty network namespace unless the VM may migrate (`network`);
- a new session (no controlling terminal to inject input into); ``no_new_privs`` (bwrap always
  sets it);
- a minimal environment (PATH, LANG, PYHV_CACHE);
- then ``setpriv`` drops root for the VM's own uid and gid (plus the group that may open
  /dev/kvm), with no capabilities left in any set.

The worker itself (``--confine``, pyhv.worker.confine) then lowers its rlimits, makes itself
not dumpable and installs its seccomp allow-list before the guest's first instruction.

Why bubblewrap rather than unshare/mount/pivot_root through ctypes in a pre-exec hook: a pid
namespace applies to children only (so a hook needs a double fork and an init), pivot_root
needs a careful order of private mounts, and ``preexec_fn`` is unsafe in a threaded VMMS.
bwrap does all of it in C, is Flatpak's sandbox (well kept, audited), and costs one exec.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pyhv
from pyhv.hypervisor.guest_ran import ENV as GUEST_RAN_ENV


class JailError(RuntimeError):
    """The jail cannot be set up (a missing tool, or not root): the message says which."""


@dataclass(frozen=True)
class Jail:
    """What one worker's jail holds."""

    uid: int
    gid: int
    #: Host files and directories the worker reads (its image, the runloop module's dir).
    read_only: tuple[str, ...] = ()
    #: Host files the worker writes (its page file), bound at the same path.
    read_write: tuple[str, ...] = ()
    #: Share the host's network namespace (a migration's source connects, its destination
    #: listens); otherwise the worker gets a new, empty one.
    network: bool = False
    #: Environment variables beyond the minimal set.
    env: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def tools() -> tuple[str, str]:
    """Paths of bwrap and setpriv; JailError saying what to install if one is missing."""
    bwrap, setpriv = shutil.which("bwrap"), shutil.which("setpriv")
    if bwrap is None:
        raise JailError("bwrap is missing: apt-get install bubblewrap (or run with --no-jail)")
    if setpriv is None:
        raise JailError("setpriv is missing: apt-get install util-linux (or run with --no-jail)")
    return bwrap, setpriv


def _runtime_paths() -> list[str]:
    """What the Python runtime and pyhv need, read-only: /usr (the interpreter, its standard
    library, libc, libseccomp), the interpreter's own prefix (a pyenv build lives outside
    /usr), the venv (sys.prefix) and the directory pyhv is imported from."""
    paths = ["/usr", sys.base_prefix, sys.prefix, str(Path(pyhv.__file__).resolve().parent)]
    return [p for p in dict.fromkeys(paths) if os.path.exists(p)]


def command(jail: Jail, argv: list[str], *, info_fd: int, block_fd: int) -> list[str]:
    """The command line that runs `argv` (the worker's) in `jail`. bwrap writes its child's
    pid (in the VMMS's pid namespace) as JSON to `info_fd` and lets the worker exec only once
    `block_fd` is readable: the owner puts the pid in its memory cgroup in between."""
    bwrap, setpriv = tools()
    kvm_gid = os.stat("/dev/kvm").st_gid
    cmd = [
        bwrap,
        # Not --die-with-parent: its PR_SET_PDEATHSIG follows the *thread* that started bwrap
        # (a VMMS request thread, gone after the reply). The worker ends when its owner's
        # socket closes, and the owner kills the jailed pid itself.
        "--new-session",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--as-pid-1",
        *([] if jail.network else ["--unshare-net"]),
    ]
    for link in ("bin", "lib", "lib64", "sbin"):
        target = os.readlink(f"/{link}") if os.path.islink(f"/{link}") else None
        if target is not None:
            cmd += ["--symlink", target, f"/{link}"]
    binds = [*_runtime_paths(), *jail.read_only]
    # Only under the test suite, which sets it: where VP threads note that guest code ran.
    ran = os.environ.get(GUEST_RAN_ENV)
    ran = ran if ran and os.path.isdir(ran) else None
    # bwrap makes a bind's missing parents 0700 (root's): the worker's uid could not pass.
    writable = [*jail.read_write, *([ran] if ran else [])]
    parents = {str(a) for p in binds + writable for a in Path(p).parents if str(a) != "/"}
    for d in sorted(parents - set(binds), key=lambda d: d.count("/")):
        if not any(d.startswith(b + "/") for b in binds):
            cmd += ["--perms", "0755", "--dir", d]
    for p in binds:
        # -try for the VM's own files: an incoming VM's image may not be on this host.
        cmd += ["--ro-bind" if p not in jail.read_only else "--ro-bind-try", p, p]
    cmd += ["--dev", "/dev", "--dev-bind", "/dev/kvm", "/dev/kvm", "--proc", "/proc"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **dict(jail.env)}
    for p in jail.read_write:
        cmd += ["--bind", p, p]
    if ran:
        cmd += ["--bind", ran, ran]
        env[GUEST_RAN_ENV] = ran
    cmd += ["--chdir", "/", "--clearenv"]
    for k, v in env.items():
        cmd += ["--setenv", k, v]
    cmd += ["--info-fd", str(info_fd), "--block-fd", str(block_fd), "--"]
    cmd += [
        setpriv,
        f"--reuid={jail.uid}",
        f"--regid={jail.gid}",
        f"--groups={kvm_gid}",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    return cmd + argv
