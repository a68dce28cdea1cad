"""docs/book-map.md claims no more than the tests do: every cited test exists, the kind shown
beside it is the kind its marker gives (tests/conftest.py proves markers at run time), and every
mechanism has at least one `guest` test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.kinds import KINDS

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
MAP = ROOT / "docs" / "book-map.md"
CITATION = re.compile(r"`(tests/[^`]+)`")
# Rows allowed without a `guest` citation: only pure decision code, and the row must say so
# ("decision code" in its book text). Keep this tiny; better, write the guest test.
DECISION_CODE_ROWS: tuple[str, ...] = ()


@dataclass(frozen=True)
class Row:
    line: int
    book: str
    citations: tuple[str, ...]
    kinds: tuple[frozenset[str], ...]


def rows() -> list[Row]:
    out = []
    header: list[str] = []
    for n, line in enumerate(MAP.read_text().splitlines(), 1):
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if not header:
            header = cells
            continue
        if set(line) <= set("|-"):
            continue
        assert "test" in header and "kind" in header, f"book-map.md:{n}: table without a kind"
        row = dict(zip(header, cells, strict=True))
        cites = tuple(CITATION.findall(row["test"]))
        kinds = tuple(frozenset(k.split("+")) for k in row["kind"].split(", "))
        out.append(Row(n, row["book"], cites, kinds))
    return out


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """nodeid -> kind for every test of every cited file, from pytest's own collection."""
    files = sorted({c.split("::")[0] for r in rows() for c in r.citations})
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert missing == [], f"book-map.md cites files that do not exist: {missing}"
    out = tmp_path_factory.mktemp("kinds") / "kinds.json"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT,
        env={**os.environ, "PYHV_KINDS_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return dict(json.loads(out.read_text()))


def kinds_of(citation: str, collected: dict[str, str]) -> set[str]:
    """The kinds of the tests a citation names: one test (all its parameters) or a whole file."""
    if "::" in citation:
        return {k for n, k in collected.items() if n == citation or n.startswith(citation + "[")}
    return {k for n, k in collected.items() if n.startswith(citation + "::")}


def test_every_row_shows_one_known_kind_per_citation() -> None:
    found = rows()
    assert len(found) > 50  # the parser saw the tables
    for r in found:
        assert r.citations, f"book-map.md:{r.line}: {r.book!r} cites no test"
        assert len(r.kinds) == len(r.citations), (
            f"book-map.md:{r.line}: {len(r.citations)} citations but {len(r.kinds)} kinds"
        )
        for k in r.kinds:
            assert k <= set(KINDS), f"book-map.md:{r.line}: unknown kind {sorted(k - set(KINDS))}"


def test_every_cited_test_exists_and_shows_the_kind_of_its_marker(
    collected: dict[str, str],
) -> None:
    wrong = []
    for r in rows():
        for cite, shown in zip(r.citations, r.kinds, strict=True):
            real = kinds_of(cite, collected)
            if not real:
                wrong.append(f"book-map.md:{r.line}: {cite} is not a collected test")
            elif real != shown:
                wrong.append(
                    f"book-map.md:{r.line}: {cite} shows {'+'.join(sorted(shown))}, "
                    f"its marker says {'+'.join(sorted(real))}"
                )
    assert wrong == []


def test_every_mechanism_has_a_guest_test() -> None:
    without = [
        f"book-map.md:{r.line}: {r.book}"
        for r in rows()
        if not any(k == {"guest"} for k in r.kinds) and r.book not in DECISION_CODE_ROWS
    ]
    assert without == []
    books = {r.book for r in rows()}
    for book in DECISION_CODE_ROWS:
        assert book in books, f"{book!r} is no longer in the map: drop it from DECISION_CODE_ROWS"
        assert "decision code" in book, f"{book!r} does not say it is pure decision code"
