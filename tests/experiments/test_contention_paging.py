"""The contention experiment with page files (`pyhv experiment contention --page-file`): when
the host is short, a VM trimmed below what its testlimit committed pages out instead of
refusing at its floor, reports it in its DM status, and the budget holds."""

from __future__ import annotations

import pytest

from pyhv.experiments.contention import ContentionConfig, run_contention

pytestmark = pytest.mark.guest


def test_a_vm_trimmed_below_its_commit_when_the_host_is_short_pages_out(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    out = tmp_path_factory.mktemp("contention-paging")
    # 1792 MiB: A and C commit 700 MiB each (demand 872 MiB with the guest's balloon floor),
    # B keeps its 256 MiB minimum: short by ~200 MiB even before any buffer, so the
    # lowest-weight VM must be trimmed below what it committed.
    config = ContentionConfig(out=out, time_scale=0.07, page_file_mib=1024, budget_mib=1792)
    result = run_contention(config, say=lambda _: None)
    paged = {n: v["page_outs"] for n, v in result.vms.items() if v["page_outs"]}
    assert paged, result.account()
    for name in paged:  # what the guest counted is what its DM status reported
        assert result.vms[name]["page_file_writes"] == paged[name], result.account()
    assert result.pool_peak_mib <= result.budget_mib
    assert "page files of 1024 MiB" in (out / "account.txt").read_text()
