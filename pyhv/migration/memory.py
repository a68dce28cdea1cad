"""Guest RAM as migration sees it: KVM dirty logging switched on and off on live memory slots,
dirty bitmaps as page runs, zero pages found without touching never-written memory, and a
checksum of all RAM that does not depend on how the host stores it (holes or zero pages).

Never-written and ballooned pages of a memfd are holes: `SEEK_DATA`/`SEEK_HOLE` skips them, and
they are never read (reading a hole of a shared memfd mapping would allocate it).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from pyhv.kvm import constants as c

if TYPE_CHECKING:
    from pyhv.hypervisor.memory import MemoryRegion

PAGE = 4096
WORDS = PAGE // 8
#: Runs of at most this many pages are split page by page in Python: each numpy call costs
#: ~5-10 us here (cold inside a pause: more), a 4 KiB copy and compare ~0.3 us.
FEW_PAGES = 16
_ZERO_PAGE = bytes(PAGE)


def set_dirty_logging(region: MemoryRegion, on: bool) -> None:
    """Turn KVM's dirty log of a live RAM slot on or off (KVM_SET_USER_MEMORY_REGION with the
    same slot, address and size: only the flags change, the VPs keep running)."""
    vm = region._vm
    if vm is None:
        raise ValueError(f"region at {region.gpa:#x} is no longer in a partition")
    flags = (c.MEM_READONLY if region.readonly else 0) | (c.MEM_LOG_DIRTY_PAGES if on else 0)
    vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_address, flags)
    region.track_dirty = on


def dirty_mask(region: MemoryRegion) -> np.ndarray:
    """One bool per page of the region: written since the last call (clears the log)."""
    bm = np.frombuffer(region.dirty_bitmap(), dtype=np.uint8)
    return np.unpackbits(bm, bitorder="little")[: region.pages].astype(bool)


def dirty_pages(region: MemoryRegion) -> np.ndarray:
    """Sorted indices of the pages written since the last call (clears the log), found in the
    packed bitmap without a bool per page: inside the pause, each fresh 256 KiB array per GiB
    costs its page faults (~0.5 ms at 1 GiB here, under nested KVM)."""
    raw = region.dirty_bitmap()
    bm = np.frombuffer(raw, dtype=np.uint8)
    nz = np.flatnonzero(bm)
    if not nz.size:
        return nz
    if nz.size <= FEW_PAGES:  # a few bytes set (an idle guest's final pass): bits in Python
        found = [i * 8 + b for i in nz.tolist() for b in range(8) if raw[i] >> b & 1]
        return np.array([i for i in found if i < region.pages], dtype=np.intp)
    bits = np.unpackbits(bm[nz], bitorder="little").reshape(-1, 8).astype(bool)
    idx = (nz[:, None] * 8 + np.arange(8))[bits]
    return idx[idx < region.pages]


def union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sorted distinct indices of both (not np.union1d: its first call imports ~16 ms of numpy,
    inside the pause)."""
    if a.size + b.size <= FEW_PAGES:  # no numpy temporaries for a final pass's few pages
        return np.array(sorted(set(a.tolist()) | set(b.tolist())), dtype=np.intp)
    idx = np.concatenate((a, b))
    if idx.size < 2:
        return idx
    idx.sort()
    return idx[np.concatenate(([True], idx[1:] != idx[:-1]))]


def _extend_runs(out: list[tuple[int, int]], i: int) -> None:
    """Index `i` (ascending) added to the (first, end) runs `out`: the last extended or a new one."""
    if out and out[-1][1] == i:
        out[-1] = (out[-1][0], i + 1)
    else:
        out.append((i, i + 1))


def _few_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """(first, end) runs of a few ascending indices, in plain Python."""
    out: list[tuple[int, int]] = []
    for i in indices:
        _extend_runs(out, i)
    return out


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) index pairs of the runs of True in a bool array."""
    if mask.size <= FEW_PAGES:  # a few pages of a final pass: no numpy temporaries
        return _few_runs(i for i, bit in enumerate(mask.tolist()) if bit)
    if not mask.any():  # most dirty bitmaps of an idle guest (a vector scan, no temporaries)
        return []
    if mask.all():  # post-copy's push steps and install slices, mostly (0.6 us, not 9)
        return [(0, mask.size)]
    if np.count_nonzero(mask) < mask.size >> 6:
        # From the set indices, not the edges of the whole mask: the final pass of an idle guest
        # (a few pages of a 1 GiB mask) costs ~10 us instead of ~1.5 ms of the downtime.
        return index_runs(np.flatnonzero(mask))
    edges = np.diff(mask.view(np.int8))  # int8: 1 byte a page, not 8
    starts = np.flatnonzero(edges == 1) + 1
    ends = np.flatnonzero(edges == -1) + 1
    if mask[0]:
        starts = np.concatenate(([0], starts))
    if mask[-1]:
        ends = np.concatenate((ends, [mask.size]))
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def index_runs(idx: np.ndarray) -> list[tuple[int, int]]:
    """(first, end) pairs of the runs in sorted, distinct indices."""
    if not idx.size:
        return []
    if idx.size <= FEW_PAGES:  # a final pass's few pages: no numpy temporaries
        return _few_runs(idx.tolist())
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate((idx[:1], idx[breaks + 1]))
    ends = np.concatenate((idx[breaks] + 1, idx[-1:] + 1))
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def data_extents(region: MemoryRegion) -> Iterator[tuple[int, int]]:
    """(first page, end page) of the region's memfd extents that hold data (not holes)."""
    fd, base, size = region.memfd, region.offset, region.size
    pos = base
    while pos < base + size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if start >= base + size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), base + size)
        yield (start - base) // PAGE, -(-(end - base) // PAGE)
        pos = end


def pages_array(region: MemoryRegion) -> np.ndarray:
    """The region's memory as (pages, 512) uint64, without copying."""
    return np.frombuffer(region.mm, dtype=np.uint64).reshape(region.pages, WORDS)


def nonzero_pages(arr: np.ndarray, first: int, end: int) -> np.ndarray:
    """Bool per page of [first, end): it holds something other than zeros. A page whose first
    word is not zero is settled by that word alone; only the others are read whole (a written
    page rarely starts with 8 zero bytes: 25x faster than reading every page, measured)."""
    nz = arr[first:end, 0] != 0
    for at in range(first, end, _CHUNK):  # bounded temporaries: arr[rest] is a copy
        part = nz[at - first : at - first + _CHUNK]
        rest = np.flatnonzero(~part)
        if rest.size:
            part[rest] = arr[at + rest].any(axis=1)
    return nz


_CHUNK = 4096  # pages (16 MiB) checked at a time


def zero_split(
    view: memoryview, arr: np.ndarray, first: int, end: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The (first, end) runs of all-zero pages and of pages holding data in [first, end) of
    a region (`view` its bytes, `arr` its pages_array). A final pass of an idle guest sends a
    few short runs: checked without numpy (~0.1 ms less of its downtime, measured)."""
    if end <= first:
        return [], []
    if end - first <= FEW_PAGES:
        zeros: list[tuple[int, int]] = []
        data: list[tuple[int, int]] = []
        for page in range(first, end):
            out = zeros if view[page * PAGE : (page + 1) * PAGE].tobytes() == _ZERO_PAGE else data
            _extend_runs(out, page)
        return zeros, data
    nz = nonzero_pages(arr, first, end)
    return (
        [(first + s, first + e) for s, e in runs(~nz)],
        [(first + s, first + e) for s, e in runs(nz)],
    )


def ram_checksum(regions: list[MemoryRegion], skip: list[tuple[int, int]] | None = None) -> str:
    """xxh3-128 over (gpa, length, bytes) of every run of non-zero pages, in GPA order: equal
    for equal contents whether the host keeps a zero page as a hole or as data. `skip` lists
    (gpa, pages) ranges left out (ballooned pages, never read)."""
    h = xxhash.xxh3_128()
    skip = sorted(skip or [])
    for r in sorted(regions, key=lambda r: r.gpa):
        arr = pages_array(r)
        for first, end in data_extents(r):
            for a, b in _minus(first, end, r, skip):
                nz = nonzero_pages(arr, a, b)
                for s, e in runs(nz):
                    gpa = r.gpa + (a + s) * PAGE
                    h.update(gpa.to_bytes(8, "little") + ((e - s) * PAGE).to_bytes(8, "little"))
                    h.update(memoryview(r.mm)[(a + s) * PAGE : (a + e) * PAGE])
    return h.hexdigest()


def _minus(
    first: int, end: int, r: MemoryRegion, skip: list[tuple[int, int]]
) -> Iterator[tuple[int, int]]:
    """[first, end) pages of region r without the skipped GPA ranges."""
    pos = first
    for gpa, n in skip:
        s = (gpa - r.gpa) // PAGE
        e = s + n
        if e <= pos or s >= end:
            continue
        if s > pos:
            yield pos, s
        pos = max(pos, e)
        if pos >= end:
            return
    if pos < end:
        yield pos, end


def skip_mask(r: MemoryRegion, skip: list[tuple[int, int]]) -> np.ndarray | None:
    """Bool per page of region r: inside one of the (gpa, pages) ranges; None if none is."""
    mask = None
    for gpa, n in skip:
        s = max((gpa - r.gpa) // PAGE, 0)
        e = min((gpa - r.gpa) // PAGE + n, r.pages)
        if s < e:
            if mask is None:
                mask = np.zeros(r.pages, dtype=bool)
            mask[s:e] = True
    return mask
