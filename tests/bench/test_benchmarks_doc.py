"""docs/benchmarks.md is generated from the benches' committed results (bench/results/*.json):
every table is headed by the run it comes from (date, CPU model, kernel, KVM module), every
figure in its tables changes when the JSON's figures do, and the committed doc is exactly what
the committed JSON generates."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest

from bench import report

pytestmark = pytest.mark.unit

#: Columns that name a row (taken from the bench's own keys or words), not figures
LABEL_COLUMNS = {"", "exit", "operation", "pattern", "host (CPU model)", "run", "VMs", "fleet",
                 "host memory", "guest"}  # fmt: skip


def tables(text: str) -> list[tuple[str | None, list[list[str]]]]:
    """Each table of the doc (header row first, separator dropped) with the run line above it
    in the same section (None if there is none)."""
    out: list[tuple[str | None, list[list[str]]]] = []
    run: str | None = None
    current: list[list[str]] | None = None
    for line in text.splitlines():
        if line.startswith("## "):
            run = None
        if line.startswith(report.RUN_PREFIX):
            run = line
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if current is None:
                current = []
                out.append((run, current))
            if not set(line) <= set("|-"):
                current.append(cells)
        else:
            current = None
    return out


def test_every_bench_committed_its_result_with_the_run_it_was_measured_on() -> None:
    results = report.load()
    assert sorted(results) == sorted((*report.BENCHES, *report.MORE_BENCHES)), (
        "run `make bench` to produce them all"
    )
    for name, data in results.items():
        run = data["run"]
        assert data["bench"] == name
        assert datetime.datetime.fromisoformat(run["date"]).tzinfo is not None, name
        for key in ("cpu_model", "kernel", "kvm_module", "python", "qemu"):
            assert run[key], f"{name}: run.{key} is empty"


def test_the_committed_doc_is_what_the_committed_results_generate() -> None:
    assert report.DOC.read_text() == report.render(report.load()), (
        "docs/benchmarks.md differs from what bench/results/*.json give: "
        "run `.venv/bin/python -m bench.report`"
    )


def test_every_table_names_the_run_its_figures_come_from() -> None:
    text = report.DOC.read_text()
    named = set()
    found = tables(text)
    assert len(found) >= 8
    for run_line, rows in found:
        assert run_line is not None, f"a table without its run above it: {rows[0]}"
        name = run_line.split("`")[1]
        data = json.loads((report.ROOT / name).read_text())
        run = data["run"]
        named.add(data["bench"])
        for want in (
            f"date {run['date']}",
            f"CPU model {run['cpu_model']}",
            f"kernel {run['kernel']}",
            f"KVM module {run['kvm_module']}",
        ):
            assert want in run_line, f"{name}: {want!r} missing from {run_line!r}"
        if "kvm_pvm" in run["kvm_module"]:
            assert "measured on PVM" in run_line
        assert ("Quick run" in run_line) == bool(run["quick"])
    assert named == {*report.BENCHES, *report.MORE_BENCHES}


def _perturbed(value: Any, key: str = "") -> Any:
    """Every figure changed (ints stay ints); the run block and words kept."""
    if key == "run" or isinstance(value, bool | str) or value is None:
        return value
    if isinstance(value, dict):
        return {k: _perturbed(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_perturbed(v) for v in value]
    if isinstance(value, int):
        return value * 3 + 7
    return value * 1.37 + 1.11  # moves even a figure shown as a whole number


def test_every_figure_in_the_tables_comes_from_the_results() -> None:
    results = report.load()
    before = tables(report.render(results))
    after = tables(report.render({k: _perturbed(v) for k, v in results.items()}))
    assert [len(rows) for _, rows in before] == [len(rows) for _, rows in after]
    checked = 0
    for (_, rows_b), (_, rows_a) in zip(before, after, strict=True):
        header = rows_b[0]
        for row_b, row_a in zip(rows_b[1:], rows_a[1:], strict=True):
            for col, cell_b, cell_a in zip(header, row_b, row_a, strict=True):
                if col in LABEL_COLUMNS or not any(ch.isdigit() for ch in cell_b):
                    continue
                checked += 1
                assert cell_b != cell_a, f"{col!r} = {cell_b!r} does not come from the JSON"
    assert checked >= 50


def test_check_mode_refuses_a_doc_edited_by_hand(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(report.render(report.load()))
    assert report.main(["--check", "--out", str(doc)]) == 0
    doc.write_text(doc.read_text().replace("| port write |", "| port write | 1 |", 1))
    assert report.main(["--check", "--out", str(doc)]) == 1


def test_qemu_that_could_not_run_with_kvm_shows_why_and_no_figures() -> None:
    results = report.load()
    error = "QEMU with KVM exited with 1: qemu-system-x86_64: failed to set MSR 0x10a |\n"
    results["intercepts"]["qemu"] = {"error": error}
    results["boot"]["qemu_microvm"] = {"error": error}
    results["boot"]["first_byte_ratio_pyhv_over_qemu"] = None
    for row in results["migration"]["rows"]:
        row["qemu"], row["downtime_pyhv_over_qemu"] = {"error": error}, None
    text = report.render(results)
    shown = "not run: QEMU with KVM exited with 1: qemu-system-x86_64: failed to set MSR 0x10a \\|"
    lines = text.splitlines()
    for start in ("| port write |", "| MMIO write |", "| `qemu-system-x86_64"):
        (line,) = [x for x in lines if x.startswith(start)]
        assert shown in line
    migration_rows = [x for x in lines if x.startswith(("| 256 MiB |", "| 1 GiB |"))]
    assert migration_rows and all(shown in x for x in migration_rows)
    assert "downtime <= QEMU's: not judged" in text
