"""Ballooned pages are kept as page ranges that merge their neighbours."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyhv.memory.ranges import PageRange, RangeError, RangeSet

pytestmark = pytest.mark.unit


def test_adjacent_ranges_merge_into_one() -> None:
    s = RangeSet([(10, 5), (20, 5)])
    s.add(15, 5)
    assert list(s) == [PageRange(10, 15)] and s.pages == 15


def test_a_page_cannot_be_added_twice() -> None:
    s = RangeSet([(10, 5)])
    with pytest.raises(RangeError, match="already"):
        s.add(14, 2)
    assert s.overlaps(0, 11) and not s.overlaps(15, 100) and not s.overlaps(0, 10)


def test_removing_the_middle_of_a_range_splits_it() -> None:
    s = RangeSet([(0, 100)])
    s.remove(40, 10)
    assert list(s) == [PageRange(0, 40), PageRange(50, 50)] and s.pages == 90
    with pytest.raises(RangeError, match="not all"):
        s.remove(35, 10)


def test_take_returns_the_highest_pages_first() -> None:
    s = RangeSet([(0, 10), (100, 10)])
    assert s.take(15) == [PageRange(100, 10), PageRange(5, 5)]
    assert list(s) == [PageRange(0, 5)]


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, 200), st.integers(1, 30)), max_size=60))
def test_the_range_set_agrees_with_a_set_of_pages(ops: list[tuple[bool, int, int]]) -> None:
    s, model = RangeSet(), set()
    for add, start, count in ops:
        pages = set(range(start, start + count))
        if add:
            if pages & model:
                with pytest.raises(RangeError):
                    s.add(start, count)
            else:
                s.add(start, count)
                model |= pages
        elif pages <= model:
            s.remove(start, count)
            model -= pages
        else:
            with pytest.raises(RangeError):
                s.remove(start, count)
        got = [p for r in s for p in range(r.start, r.end)]
        assert got == sorted(model) and s.pages == len(model)
        rs = list(s)
        assert all(
            a.end < b.start for a, b in zip(rs, rs[1:], strict=False)
        )  # merged: no touching ranges


def test_a_range_sets_difference_is_the_pages_of_one_not_in_the_other() -> None:
    a, b = RangeSet([(0, 10), (20, 10)]), RangeSet([(2, 3), (8, 14), (28, 5)])
    assert a.difference(b) == [PageRange(0, 2), PageRange(5, 3), PageRange(22, 6)]
    assert b.difference(a) == [PageRange(10, 10), PageRange(30, 3)]
    assert a.difference(RangeSet()) == list(a) and RangeSet().difference(a) == []
