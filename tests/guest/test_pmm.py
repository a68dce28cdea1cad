"""The guest's physical memory manager, built for the host and driven against a page-by-page model:
every page is RAM or not, and free, allocated or ballooned; the counters the Dynamic Memory VSC
reports always agree with the pages; an operation on pages in the wrong state changes nothing."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pyhv.guest_image import GUEST_DIR

HERE = Path(__file__).parent
PAGE = 4096
BLOCK = 512  # pages in 2 MiB
SPAN = 64 << 20  # the model covers the first 64 MiB of guest-physical space
PAGES = SPAN // PAGE
MAX_OUT = 64
# RAM at boot: low memory, and 1 MiB .. 24 MiB + 12 KiB (an unaligned end: a split last block);
# the kernel image ends at 0x1f2000 (a split first block), as the real image does.
MEMMAP = [(0, 0x9F000), (0x100000, (23 << 20) + 0x3000)]
FREE_FROM = 0x1F2000
NOT_RAM, FREE, ALLOC, BALLOON = "-", "F", "A", "B"


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
        self.page = [NOT_RAM] * PAGES
        for base, size in MEMMAP:
            for p in range(base // PAGE, (base + size) // PAGE):
                self.page[p] = ALLOC if p < FREE_FROM // PAGE else FREE
        self.kernel = sum(1 for s in self.page if s == ALLOC)
        self.hot_added = 0

    # --- helpers ---------------------------------------------------------------------

    def count(self, state: str) -> int:
        return sum(1 for s in self.page if s == state)

    def stats(self) -> Stats:
        s = Stats()
        self.lib.pmm_stats(ctypes.byref(s))
        return s

    def take(self, ranges: ctypes.Array[Range], n: int, to: str) -> int:
        got = 0
        for r in ranges[:n]:
            assert r.base % PAGE == 0 and r.pages > 0
            first = r.base // PAGE
            assert all(s == FREE for s in self.page[first : first + r.pages]), (
                "handed out a page that was not free"
            )
            self.page[first : first + r.pages] = [to] * r.pages
            got += r.pages
        return got

    def runs(self, state: str) -> list[tuple[int, int]]:
        out, p = [], 0
        while p < PAGES:
            if self.page[p] == state:
                q = p
                while q < PAGES and self.page[q] == state:
                    q += 1
                out.append((p, q - p))
                p = q
            else:
                p += 1
        return out

    # --- rules -----------------------------------------------------------------------

    @rule(n=st.integers(1, 3 * BLOCK))
    def alloc(self, n: int) -> None:
        free = self.count(FREE)
        out = (Range * MAX_OUT)()
        nout = ctypes.c_uint32()
        got = self.lib.pmm_alloc(n, out, MAX_OUT, ctypes.byref(nout))
        assert self.take(out, nout.value, ALLOC) == got
        assert got == min(n, free) or nout.value == MAX_OUT

    @rule(n=st.integers(1, 3 * BLOCK), floor=st.integers(0, 2 * BLOCK))
    def balloon_take(self, n: int, floor: int) -> None:
        free = self.count(FREE)
        whole_free_block = any(
            all(s == FREE for s in self.page[b : b + BLOCK]) for b in range(0, PAGES, BLOCK)
        )
        out = (Range * MAX_OUT)()
        nout = ctypes.c_uint32()
        got = self.lib.pmm_balloon_take(n, floor, out, MAX_OUT, ctypes.byref(nout))
        assert self.take(out, nout.value, BALLOON) == got
        assert got == min(n, max(free - floor, 0)) or nout.value == MAX_OUT
        if whole_free_block and min(n, free - floor) >= BLOCK:
            # 2 MiB runs first: the balloon gets at least one whole aligned block
            assert any(r.base % (BLOCK * PAGE) == 0 and r.pages >= BLOCK for r in out[: nout.value])

    @rule(data=st.data(), state=st.sampled_from([ALLOC, BALLOON]))
    def give_back(self, data: st.DataObject, state: str) -> None:
        """Free an allocated range, or unballoon a ballooned one (any part of a run)."""
        runs = [r for r in self.runs(state) if r[0] >= FREE_FROM // PAGE]
        if not runs:
            return
        first, n = data.draw(st.sampled_from(runs))
        lo = data.draw(st.integers(first, first + n - 1))
        hi = data.draw(st.integers(lo + 1, first + n))
        fn = self.lib.pmm_free if state == ALLOC else self.lib.pmm_balloon_give
        assert fn(lo * PAGE, hi - lo) == 0
        self.page[lo:hi] = [FREE] * (hi - lo)

    @rule(data=st.data(), state=st.sampled_from([ALLOC, BALLOON]))
    def give_back_what_is_not_held(self, data: st.DataObject, state: str) -> None:
        """A range with any page not in the state (free, the other state, or not RAM) is refused."""
        lo = data.draw(st.integers(0, PAGES - 1))
        hi = data.draw(st.integers(lo + 1, min(PAGES, lo + 3 * BLOCK)))
        if all(s == state for s in self.page[lo:hi]):
            return
        before = self.stats()
        fn = self.lib.pmm_free if state == ALLOC else self.lib.pmm_balloon_give
        assert fn(lo * PAGE, hi - lo) == -1
        assert bytes(self.stats()) == bytes(before)

    @rule(first=st.integers(0, PAGES - 1), n=st.integers(1, 4 * BLOCK))
    def hot_add(self, first: int, n: int) -> None:
        n = min(n, PAGES - first)
        fits = all(s == NOT_RAM for s in self.page[first : first + n])
        assert (self.lib.pmm_hot_add(first * PAGE, n) == 0) == fits
        if fits:
            self.page[first : first + n] = [FREE] * n
            self.hot_added += n

    @invariant()
    def counters_agree_with_the_pages(self) -> None:
        s = self.stats()
        assert s.free == self.count(FREE)
        assert s.ballooned == self.count(BALLOON)
        assert s.visible == PAGES - self.count(NOT_RAM)
        assert s.hot_added == self.hot_added
        assert s.committed == self.kernel  # commit is the callers' business
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
