"""Reading the reference guest's account of a paging testlimit task (its `tasks` line)."""

from __future__ import annotations

import re
from collections.abc import Callable

_LINE = re.compile(
    r"paged out (\d+) pages, filled (\d+), verify (\d+) of (\d+): (\d+) pages checked, (\d+) bad"
)
_KEYS = ("paged_out", "filled", "verified", "asked", "checked", "bad")


def paging_task(tasks_output: str) -> dict[str, int]:
    """The first task with a paging window in `tasks` output: pages paged out, pages filled with
    their pattern, verify passes done / asked, pages checked and bad in the last one."""
    m = _LINE.search(tasks_output)
    assert m, f"no task with a paging window in: {tasks_output!r}"
    return dict(zip(_KEYS, map(int, m.groups()), strict=True))


def verify_pages(run: Callable[[str], str], timeout: float = 120) -> dict[str, int]:
    """Type `verify` (testlimit checks every page once more; paged-out ones come back through
    the page fault path) and wait until the task has done it; its `paging_task` figures."""
    from tests.support.wait import wait_for

    asked = paging_task(run("tasks"))["asked"] + 1
    assert "verify: 1 testlimit tasks" in run("verify")
    return wait_for(
        lambda: (t := paging_task(run("tasks")))["verified"] == asked and t,
        timeout,
        "testlimit's check of its pages",
    )
