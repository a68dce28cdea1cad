"""Runtime memory resize: Windows Server 2016's `Set-VMMemory -StartupBytes` on a running VM.

A larger size is hot-added, a smaller one hot-removed (Dynamic Memory protocol 2.0,
docs/dynamic-memory.md), both through the VM's worker. The size is the VM's Guest Visible
Physical Memory afterwards, with nothing ballooned (as for a VM of that fixed size): a grow is
the target `size` (unballoon, then hot-add the rest); a shrink first gives back a balloon (so the
guest holds all its memory and chooses what to vacate), then asks the guest to give the
difference back offline. The guest decides what it can vacate: the answer says what it gave.
"""

from __future__ import annotations

import time
from typing import Any

from pyhv.dynmem.balancer import PAGE_SIZE
from pyhv.vmms.balancing import DynamicMemoryWorker
from pyhv.vmms.config import VmSettings
from pyhv.vmms.pool import HostPool
from pyhv.worker.config import format_size

#: Hot-remove works in whole 2 MiB blocks (DM_REMOVE_QOS_LARGE): sizes are multiples of it.
BLOCK = 2 << 20


class ResizeError(ValueError):
    """A size this VM cannot be resized to: the message says why and what would do."""


class ResizeUnavailable(RuntimeError):
    """The worker or its guest cannot resize now (busy, no hot-remove, no answer)."""


def check_size(name: str, size: int, s: VmSettings, pool: HostPool) -> None:
    """Refuse, with the reason, a size the VM cannot have: not whole 2 MiB blocks, outside its
    Dynamic Memory range, or more than the host's free memory can give (KeyError: the pool
    does not hold the VM)."""
    if size % BLOCK:
        raise ResizeError(
            f"memory {format_size(size)} is not a multiple of 2M: Dynamic Memory adds and "
            "removes memory of a running VM in 2 MiB blocks; round it"
        )
    if size < s.minimum:
        raise ResizeError(
            f"memory {format_size(size)} is below VM {name!r}'s minimum {format_size(s.minimum)}:"
            " lower the minimum first (--minimum) or pick a larger size"
        )
    if size > s.maximum:
        raise ResizeError(
            f"memory {format_size(size)} is above VM {name!r}'s maximum {format_size(s.maximum)}:"
            " raise the maximum first (--maximum) or pick a smaller size"
        )
    visible, assigned, _ = pool.pages(name)
    # A grow unballoons and hot-adds up to `size`; a shrink gives the balloon back first.
    needed = max(size // PAGE_SIZE, visible) - assigned
    if needed > pool.free_pages:
        raise ResizeError(
            f"memory {format_size(size)} needs {format_size(needed * PAGE_SIZE)} more for VM "
            f"{name!r}, above the host's free memory {format_size(pool.free_pages * PAGE_SIZE)}:"
            " free memory on the host or pick a smaller size"
        )


def _settled(name: str, pool: HostPool, after: int, timeout: float) -> None:
    """Until the worker pushed a status newer than `after` statuses with nothing in progress."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pool.holds(name):
            raise ResizeUnavailable(f"VM {name!r} ended during the resize")
        st = pool.latest(name)
        if pool.received(name) > after and st is not None and not st.busy:
            return
        time.sleep(0.05)
    raise ResizeUnavailable(
        f"VM {name!r}: its guest did not finish the memory change within {timeout:g} s"
    )


def resize(
    name: str, port: DynamicMemoryWorker, worker: object, pool: HostPool, size: int,
    timeout: float = 60.0,
) -> dict[str, Any]:  # fmt: skip
    """Resize running VM `name` to `size` bytes of Guest Visible Physical Memory (checked by
    check_size). Returns the figures: asked, before, visible, added, removed, complete."""
    target = size // PAGE_SIZE
    try:
        _settled(name, pool, pool.received(name) - 1, timeout)  # a balancer move in flight ends
        before, _, ballooned = pool.pages(name)
        if target > before:
            port.set_memory_target(size)
            _settled(name, pool, pool.received(name), timeout)
        elif target < before:
            status = getattr(worker, "memory_status", None)
            hot_remove = getattr(worker, "hot_remove_memory", None)
            if status is None or hot_remove is None or not status().get("hot_remove"):
                raise ResizeUnavailable(
                    f"VM {name!r}: its guest did not negotiate hot-remove (Dynamic Memory "
                    "protocol 2.0), so memory cannot be taken back while it runs: stop it and "
                    "set the startup memory, or lower the balancer's target (--target)"
                )
            if ballooned:
                port.set_memory_target(before * PAGE_SIZE)
                _settled(name, pool, pool.received(name), timeout)
            hot_remove(before - target)
            _settled(name, pool, pool.received(name), timeout)
        visible = pool.pages(name)[0]
    except KeyError:  # the pool gave it back: the VM ended meanwhile
        raise ResizeUnavailable(f"VM {name!r} ended during the resize") from None
    except ResizeUnavailable:
        raise
    except RuntimeError as e:
        raise ResizeUnavailable(f"VM {name!r}: the worker refused the resize: {e}") from None
    return {
        "name": name,
        "asked": size,
        "before": before * PAGE_SIZE,
        "visible": visible * PAGE_SIZE,
        "added": max(0, visible - before) * PAGE_SIZE,
        "removed": max(0, before - visible) * PAGE_SIZE,
        "complete": visible == target,
    }


def shortfall(r: dict[str, Any]) -> str:
    """What a resize the guest did not complete did, with its figures."""
    if r["asked"] < r["before"]:
        return (
            f"VM {r['name']}: asked to shrink to {format_size(r['asked'])} (remove "
            f"{format_size(r['before'] - r['asked'])}); the guest removed "
            f"{format_size(r['removed'])}: it could not vacate the rest (memory in use); "
            f"Guest Visible Physical Memory is now {format_size(r['visible'])}"
        )
    return (
        f"VM {r['name']}: asked to grow to {format_size(r['asked'])} (add "
        f"{format_size(r['asked'] - r['before'])}); the guest took {format_size(r['added'])}; "
        f"Guest Visible Physical Memory is now {format_size(r['visible'])}"
    )
