"""The guest's physical memory manager, built for the host and driven against a page-by-page model:
every page is RAM or not, and free, allocated or ballooned; the counters the Dynamic Memory VSC
reports always agree with the pages; an operation on pages in the wrong state changes nothing."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pyhv.guest_image import GUEST_DIR
from tests.support.floor import floor_pages

pytestmark = pytest.mark.unit

HERE = Path(__file__).parent
PAGE = 4096
BLOCK = 512  # pages in 2 MiB
WORD = 64 * BLOCK  # pages in 128 MiB: 64 blocks, one word of the block bitmaps
SPAN = 512 << 20  # the model covers the first 512 MiB of guest-physical space
PAGES = SPAN // PAGE
MAX_OUT = 64
# RAM at boot: low memory, and 1 MiB .. 300 MiB + 12 KiB (an unaligned end: a split last block,
# and one whole bitmap word of blocks); the kernel image ends at 0x1f2000 (a split first block),
# as the real image does.
MEMMAP = [(0, 0x9F000), (0x100000, (299 << 20) + 0x3000)]
FREE_FROM = 0x1F2000
NOT_RAM, FREE, ALLOC, BALLOON = 0, 1, 2, 3
SIZES = st.one_of(st.integers(1, 3 * BLOCK), st.integers(1, 3 * WORD))


class Range(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("pages", ctypes.c_uint64)]


class Stats(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64) for n in ("visible", "free", "committed", "ballooned", "hot_added")
    ]


class MemmapEntry(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


@pytest.fixture(scope="module")
def pmm_library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build guest/pmm.c for the host")
    out = tmp_path_factory.mktemp("pmm") / "pmm.so"
    subprocess.run(
        [
            "gcc",
            "-O1",
            "-g",
            "-shared",
            "-fPIC",
            "-fno-builtin",
            "-Wall",
            "-Werror",
            "-Wno-builtin-declaration-mismatch",
            "-DKERNEL_HOST_TEST",
            "-I",
            str(GUEST_DIR),
            "-o",
            str(out),
            str(GUEST_DIR / "pmm.c"),
            str(HERE / "pmm_host.c"),
        ],
        check=True,
    )
    return out


def load(library: Path) -> ctypes.CDLL:
    """A fresh copy: the pmm's state is global, each run starts from boot."""
    copy = library.with_name(f"pmm-{uuid.uuid4().hex}.so")
    shutil.copy(library, copy)
    lib = ctypes.CDLL(str(copy))
    copy.unlink()
    u64, u32, p = ctypes.c_uint64, ctypes.c_uint32, ctypes.POINTER
    lib.pmm_init.argtypes = [u64]
    lib.pmm_alloc.argtypes = [u64, p(Range), u32, p(u32)]
    lib.pmm_alloc.restype = u64
    lib.pmm_balloon_take.argtypes = [u64, u64, p(Range), u32, p(u32)]
    lib.pmm_balloon_take.restype = u64
    for f in (lib.pmm_free, lib.pmm_hot_add, lib.pmm_balloon_give):
        f.argtypes = [u64, u64]
        f.restype = ctypes.c_int
    lib.pmm_balloon_floor.restype = u64
    lib.pmm_hot_remove_region.argtypes = [u64, u64, u64]
    lib.pmm_hot_remove_region.restype = ctypes.c_int
    lib.pmm_hot_remove_blocks.argtypes = [u64, u64, u64, u64, p(Range), u32, p(u32)]
    lib.pmm_hot_remove_blocks.restype = u64
    lib.pmm_commit.argtypes = lib.pmm_uncommit.argtypes = [u64]
    entries = (MemmapEntry * len(MEMMAP))(*[MemmapEntry(b, s, 1, 0) for b, s in MEMMAP])
    lib.host_set_memmap(u32(len(MEMMAP)), entries)
    lib.pmm_init(FREE_FROM)
    return lib


class PmmModel(RuleBasedStateMachine):
    library: Path

    def __init__(self) -> None:
        super().__init__()
        self.lib = load(self.library)
        self.page = np.full(PAGES, NOT_RAM, dtype=np.int8)
        for base, size in MEMMAP:
            self.page[base // PAGE : (base + size) // PAGE] = FREE
        self.page[: FREE_FROM // PAGE][self.page[: FREE_FROM // PAGE] == FREE] = ALLOC
        self.kernel = self.count(ALLOC)
        self.hot_added = 0
        self.regions: list[tuple[int, int]] = []  # (first page, pages) of each hot-add

    # --- helpers ---------------------------------------------------------------------

    def count(self, state: int) -> int:
        return int(np.count_nonzero(self.page == state))

    def all_in(self, lo: int, hi: int, state: int) -> bool:
        return bool(np.all(self.page[lo:hi] == state))

    def stats(self) -> Stats:
        s = Stats()
        self.lib.pmm_stats(ctypes.byref(s))
        return s

    def take(self, ranges: ctypes.Array[Range], n: int, to: int) -> int:
        got = 0
        for r in ranges[:n]:
            assert r.base % PAGE == 0 and r.pages > 0
            first = r.base // PAGE
            assert self.all_in(first, first + r.pages, FREE), "handed out a page that was not free"
            self.page[first : first + r.pages] = to
            got += r.pages
        return got

    def runs(self, state: int) -> list[tuple[int, int]]:
        """(first page, pages) of each maximal run of pages in state."""
        inside = np.concatenate(([0], (self.page == state).astype(np.int8), [0]))
        edges = np.flatnonzero(np.diff(inside))
        return [(int(a), int(b - a)) for a, b in zip(edges[::2], edges[1::2], strict=True)]

    def whole_free_block(self) -> bool:
        return bool(np.any(np.all(self.page.reshape(-1, BLOCK) == FREE, axis=1)))

    # --- rules -----------------------------------------------------------------------

    @rule(n=SIZES)
    def alloc(self, n: int) -> None:
        free = self.count(FREE)
        out = (Range * MAX_OUT)()
        nout = ctypes.c_uint32()
        got = self.lib.pmm_alloc(n, out, MAX_OUT, ctypes.byref(nout))
        assert self.take(out, nout.value, ALLOC) == got
        assert got == min(n, free) or nout.value == MAX_OUT

    @rule(n=SIZES, floor=st.integers(0, 2 * BLOCK))
    def balloon_take(self, n: int, floor: int) -> None:
        free = self.count(FREE)
        whole_free_block = self.whole_free_block()
        out = (Range * MAX_OUT)()
        nout = ctypes.c_uint32()
        got = self.lib.pmm_balloon_take(n, floor, out, MAX_OUT, ctypes.byref(nout))
        assert self.take(out, nout.value, BALLOON) == got
        assert got == min(n, max(free - floor, 0)) or nout.value == MAX_OUT
        if whole_free_block and min(n, free - floor) >= BLOCK:
            # 2 MiB runs first: the balloon gets at least one whole aligned block
            assert any(r.base % (BLOCK * PAGE) == 0 and r.pages >= BLOCK for r in out[: nout.value])

    @rule(data=st.data(), state=st.sampled_from([ALLOC, BALLOON]))
    def give_back(self, data: st.DataObject, state: int) -> None:
        """Free an allocated range, or unballoon a ballooned one (any part of a run)."""
        runs = [r for r in self.runs(state) if r[0] >= FREE_FROM // PAGE]
        if not runs:
            return
        first, n = data.draw(st.sampled_from(runs))
        lo = data.draw(st.integers(first, first + n - 1))
        hi = data.draw(st.integers(lo + 1, first + n))
        fn = self.lib.pmm_free if state == ALLOC else self.lib.pmm_balloon_give
        assert fn(lo * PAGE, hi - lo) == 0
        self.page[lo:hi] = FREE

    @rule(data=st.data(), state=st.sampled_from([ALLOC, BALLOON]))
    def give_back_what_is_not_held(self, data: st.DataObject, state: int) -> None:
        """A range with any page not in the state (free, the other state, or not RAM) is refused."""
        lo = data.draw(st.integers(0, PAGES - 1))
        hi = data.draw(st.integers(lo + 1, min(PAGES, lo + data.draw(SIZES))))
        if self.all_in(lo, hi, state):
            return
        before = self.stats()
        fn = self.lib.pmm_free if state == ALLOC else self.lib.pmm_balloon_give
        assert fn(lo * PAGE, hi - lo) == -1
        assert bytes(self.stats()) == bytes(before)

    @rule(
        first=st.one_of(st.integers(0, PAGES - 1), st.integers(0, 3).map(lambda w: w * WORD)),
        n=SIZES,
    )
    def hot_add(self, first: int, n: int) -> None:
        n = min(n, PAGES - first)
        fits = self.all_in(first, first + n, NOT_RAM)
        assert (self.lib.pmm_hot_add(first * PAGE, n) == 0) == fits
        if fits:
            self.page[first : first + n] = FREE
            self.hot_added += n
            self.regions.append((first, n))

    @rule(data=st.data(), floor=st.integers(0, 4 * BLOCK))
    def hot_remove_region(self, data: st.DataObject, floor: int) -> None:
        """A whole hot-added region goes offline only if every page of it is free, it starts on a
        block and the floor stays free; otherwise nothing changes."""
        if not self.regions:
            return
        first, n = data.draw(st.sampled_from(self.regions))
        free = self.count(FREE)
        before = self.stats()
        ok = self.lib.pmm_hot_remove_region(first * PAGE, n, floor) == 0
        possible = first % BLOCK == 0 and self.all_in(first, first + n, FREE) and free >= floor + n
        if (first + n) % BLOCK == 0:  # a split tail block may lack its descriptor: no promise
            assert ok == possible
        if not ok:
            assert bytes(self.stats()) == bytes(before)
            return
        assert possible
        self.page[first : first + n] = NOT_RAM
        self.hot_added -= n

    @rule(data=st.data(), most=SIZES, floor=st.integers(0, 4 * BLOCK))
    def hot_remove_blocks(self, data: st.DataObject, most: int, floor: int) -> None:
        """Free whole 2 MiB blocks of a region go offline, highest first, never below the floor."""
        if not self.regions:
            return
        first, n = data.draw(st.sampled_from(self.regions))
        free = self.count(FREE)
        out = (Range * MAX_OUT)()
        nout = ctypes.c_uint32()
        got = self.lib.pmm_hot_remove_blocks(
            first * PAGE, n, most, floor, out, MAX_OUT, ctypes.byref(nout)
        )
        assert got <= most and (got == 0 or free - got >= floor) and got % BLOCK == 0
        assert sum(r.pages for r in out[: nout.value]) == got
        for r in out[: nout.value]:
            lo = r.base // PAGE
            assert lo % BLOCK == 0 and r.pages % BLOCK == 0
            assert first <= lo and lo + r.pages <= first + n, "a block outside the region"
            assert self.all_in(lo, lo + r.pages, FREE), "took a page that was not free"
            self.page[lo : lo + r.pages] = NOT_RAM
        self.hot_added -= got

    @invariant()
    def counters_agree_with_the_pages(self) -> None:
        s = self.stats()
        assert s.free == self.count(FREE)
        assert s.ballooned == self.count(BALLOON)
        assert s.visible == PAGES - self.count(NOT_RAM)
        assert s.hot_added == self.hot_added
        assert s.committed == self.kernel  # commit is the callers' business
        # hv_balloon's floor of the RAM less the balloon, but of no more than the boot RAM:
        # hot-added memory does not raise it (the demand it is part of stays where it was)
        boot = s.visible - s.hot_added
        assert self.lib.pmm_balloon_floor() == floor_pages(s.visible - s.ballooned, boot)
        assert self.lib.pmm_check() == 0


def test_the_memory_manager_agrees_with_a_page_by_page_model(pmm_library: Path) -> None:
    PmmModel.library = pmm_library
    run = PmmModel.TestCase
    run.settings = settings(
        max_examples=60,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    run().runTest()
