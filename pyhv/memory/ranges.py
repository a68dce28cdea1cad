"""Page ranges and a set of them that merges neighbours (like QEMU hv-balloon's range trees)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from typing import NamedTuple


class PageRange(NamedTuple):
    """`count` 4 KiB pages from page frame number `start`."""

    start: int
    count: int  # type: ignore[assignment]  # shadows tuple.count on purpose

    @property
    def end(self) -> int:
        return self.start + self.count


class RangeError(ValueError):
    """A range does not fit the set as asked (overlap on add, not contained on remove)."""


class RangeSet:
    """Disjoint, sorted page ranges; adjacent ranges are merged into one."""

    def __init__(self, ranges: Iterable[PageRange | tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.pages = 0
        for s, c in ranges:
            self.add(s, c)

    def __iter__(self) -> Iterator[PageRange]:
        for s, e in zip(self._starts, self._ends, strict=True):
            yield PageRange(s, e - s)

    def __len__(self) -> int:
        return len(self._starts)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    def overlaps(self, start: int, count: int) -> bool:
        """Whether any page of [start, start+count) is in the set."""
        if count <= 0:
            return False
        i = bisect.bisect_right(self._starts, start + count - 1) - 1
        return i >= 0 and self._ends[i] > start

    def contains(self, start: int, count: int) -> bool:
        """Whether every page of [start, start+count) is in the set."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= start + count

    def add(self, start: int, count: int) -> None:
        """Add pages that are not in the set yet (RangeError if any is)."""
        if count <= 0 or start < 0:
            raise RangeError(f"range start={start:#x} count={count}: need start >= 0, count > 0")
        if self.overlaps(start, count):
            raise RangeError(f"pages {start:#x}+{count} are already (partly) in the set")
        end = start + count
        i = bisect.bisect_left(self._starts, start)
        merge_left = i > 0 and self._ends[i - 1] == start
        merge_right = i < len(self._starts) and self._starts[i] == end
        if merge_left and merge_right:
            self._ends[i - 1] = self._ends[i]
            del self._starts[i], self._ends[i]
        elif merge_left:
            self._ends[i - 1] = end
        elif merge_right:
            self._starts[i] = start
        else:
            self._starts.insert(i, start)
            self._ends.insert(i, end)
        self.pages += count

    def remove(self, start: int, count: int) -> None:
        """Remove pages that are all in the set (RangeError otherwise)."""
        if count <= 0 or not self.contains(start, count):
            raise RangeError(f"pages {start:#x}+{count} are not all in the set")
        i = bisect.bisect_right(self._starts, start) - 1
        s, e = self._starts[i], self._ends[i]
        end = start + count
        if s == start and e == end:
            del self._starts[i], self._ends[i]
        elif s == start:
            self._starts[i] = end
        elif e == end:
            self._ends[i] = start
        else:
            self._ends[i] = start
            self._starts.insert(i + 1, end)
            self._ends.insert(i + 1, e)
        self.pages -= count

    def difference(self, other: RangeSet) -> list[PageRange]:
        """The pages of this set that are not in `other`, as ranges."""
        out: list[PageRange] = []
        for s, e in zip(self._starts, self._ends, strict=True):
            i = max(0, bisect.bisect_right(other._starts, s) - 1)
            while s < e:
                while i < len(other._starts) and other._ends[i] <= s:
                    i += 1
                if i == len(other._starts) or other._starts[i] >= e:
                    out.append(PageRange(s, e - s))
                    break
                if other._starts[i] > s:
                    out.append(PageRange(s, other._starts[i] - s))
                s = other._ends[i]
        return out

    def take(self, pages: int) -> list[PageRange]:
        """Remove and return up to `pages` pages, highest addresses first."""
        out: list[PageRange] = []
        while pages > 0 and self._starts:
            s, e = self._starts[-1], self._ends[-1]
            n = min(pages, e - s)
            self.remove(e - n, n)
            out.append(PageRange(e - n, n))
            pages -= n
        return out
