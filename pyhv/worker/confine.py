"""What a jailed worker does to itself before the guest runs (docs/security.md): lower its
resource limits, make itself not dumpable, and install its seccomp allow-list.

The mount, pid and network namespaces, the uid/gid and ``no_new_privs`` come from outside
(pyhv.worker.jail, bubblewrap); these three are per-process settings the worker can only make
tighter, so it sets them itself at start-up, before it reads any guest input.

The allow-list is what a worker was traced calling (``tools/trace_worker_syscalls.py``: boot,
shell, Dynamic Memory add/balloon/unballoon, stop) plus what live migration and the Python
runtime use (sockets, sleeps). Everything else kills the whole worker (SECCOMP_RET_KILL_PROCESS,
which the kernel logs to the audit log); the VMMS reports it as "killed by SIGSYS". ``ioctl`` is
allowed whole: KVM's many requests on the VM and VP fds are the worker's job, and its other fds
are its own. No exec, no new processes (``clone`` only with CLONE_THREAD; ``clone3``, whose flags
seccomp cannot see, answers ENOSYS so glibc falls back to ``clone``), no ptrace, no mount.
"""

from __future__ import annotations

import ctypes
import errno
import resource
from typing import Any

#: Kernel calls a worker makes, traced and reviewed (see the module's docstring).
ALLOWED = (
    # memory, files the worker opened itself (its jail's root holds nothing else)
    "brk mmap munmap mprotect mremap madvise mbind msync memfd_create ftruncate fallocate "
    "read write readv writev pread64 pwrite64 lseek close close_range dup dup2 dup3 fcntl "
    "openat access faccessat2 newfstatat fstat lstat stat statx readlink readlinkat getdents64 "
    "getcwd fstatfs fadvise64 fsync fdatasync umask uname sysinfo getrandom "
    # threads and their synchronisation
    "clone futex set_robust_list get_robust_list rseq set_tid_address gettid getpid getppid "
    "exit exit_group sched_getaffinity sched_yield arch_prctl prlimit64 getrlimit getrusage "
    "membarrier "
    # signals (a VP is kicked out of KVM_RUN with a signal to its own thread)
    "rt_sigaction rt_sigprocmask rt_sigreturn rt_sigtimedwait sigaltstack tgkill restart_syscall "
    # waiting and time
    "poll ppoll select pselect6 epoll_create1 epoll_ctl epoll_wait epoll_pwait eventfd2 pipe2 "
    "nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday "
    # KVM, and the owner's socket; live migration's TCP stream
    "ioctl socket connect bind listen accept accept4 getsockname getpeername getsockopt "
    "setsockopt shutdown sendto recvfrom sendmsg recvmsg "
    # post-copy's destination uses an fd of /dev/userfaultfd its owner passed; the system call
    # itself only answers EPERM to the jail's unprivileged uid (vm.unprivileged_userfaultfd=0)
    # instead of killing the worker
    "userfaultfd "
    # a migration's pause asks SCHED_FIFO for its threads (pyhv.migration.realtime); the jail's
    # uid may not (EPERM, counted), so this only lets it ask instead of killing the worker
    "sched_setscheduler "
    # identity (reads only)
    "getuid geteuid getgid getegid getgroups"
).split()

#: Resource limits of a jailed worker: open files (its VM's fds: memslots, VPs, eventfds, a
#: migration's socket), threads (VPs plus a few helpers: NPROC counts the uid's tasks, and the
#: uid is this VM's alone), no core file. The largest file (RLIMIT_FSIZE) is the VM's largest
#: memory: it writes no file, but ftruncate of its RAM memfds is held to it too.
RLIMITS = {
    resource.RLIMIT_NOFILE: 1024,
    resource.RLIMIT_NPROC: 512,
    resource.RLIMIT_CORE: 0,
}

_PR_SET_DUMPABLE = 4
_CLONE_THREAD = 0x00010000


class ConfineError(RuntimeError):
    """The worker could not confine itself (it refuses to run the guest then)."""


def confine(max_file_bytes: int) -> None:
    """Limits, not dumpable, then the seccomp allow-list, in that order (the filter would
    refuse nothing of the first two, but they must not depend on it). `max_file_bytes`: the
    VM's largest memory (its RAM memfds' size)."""
    for which, limit in {**RLIMITS, resource.RLIMIT_FSIZE: max_file_bytes}.items():
        _soft, hard = resource.getrlimit(which)
        new = limit if hard == resource.RLIM_INFINITY else min(limit, hard)
        resource.setrlimit(which, (new, new))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise ConfineError(f"prctl(PR_SET_DUMPABLE, 0): errno {ctypes.get_errno()}")
    install_seccomp()


#: The sonames pyseccomp loads (fixed by the libraries' ABI).
_SONAMES = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}


def _import_pyseccomp() -> Any:
    """pyseccomp (libseccomp through ctypes), imported with ctypes.util.find_library answering
    the sonames itself: find_library runs gcc in a temporary directory (tens of ms of every
    VM's start, and the jail has no /tmp)."""
    import ctypes.util

    original = ctypes.util.find_library
    ctypes.util.find_library = lambda name: _SONAMES.get(name) or original(name)
    try:
        import pyseccomp
    except ImportError as e:
        raise ConfineError(f"pyseccomp is missing ({e}): pip install pyseccomp") from None
    except OSError as e:
        raise ConfineError(
            f"libseccomp cannot be loaded ({e}): apt-get install libseccomp2"
        ) from None
    finally:
        ctypes.util.find_library = original
    return pyseccomp


def install_seccomp() -> None:
    """Load the allow-list into every thread of this process (TSYNC)."""
    seccomp = _import_pyseccomp()
    try:
        f = seccomp.SyscallFilter(seccomp.KILL_PROCESS)
        f.set_attr(seccomp.Attr.CTL_TSYNC, 1)
        for name in ALLOWED:
            if name != "clone":
                f.add_rule(seccomp.ALLOW, name)
        # Threads only: a clone without CLONE_THREAD (fork) is refused like any other call.
        f.add_rule(
            seccomp.ALLOW, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD)
        )
        f.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        f.load()
    except (OSError, RuntimeError, ValueError) as e:
        raise ConfineError(f"cannot install the seccomp filter (libseccomp2): {e}") from None
