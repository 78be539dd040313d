"""The TP block demo: one all-reduce per MLP and per attention block, forward and backward, on 2 gloo ranks."""
from __future__ import annotations

import pytest
import torch.distributed as dist

from hybridpar.config import ParallelConfigError
from hybridpar.demos.tp_block import check_tp_size, count_collectives, format_report, format_table, run_block_demo


def test_one_all_reduce_per_block_forward_and_backward():
    rows = run_block_demo(2, backend="gloo")
    assert [r["rank"] for r in rows] == [0, 0, 0, 1, 1, 1]
    assert all(r["output ok"] and r["input grad ok"] for r in rows), format_table(rows)
    by_block = {r["block"]: r for r in rows if r["rank"] == 1}
    for block in ("MLP (column -> row)", "attention (QKV -> o_proj)"):
        assert by_block[block]["forward"] == {"all_reduce": 1}
        assert by_block[block]["backward"] == {"all_reduce": 1}
    naive = by_block["MLP, gathered in between"]
    assert naive["forward"] == {"all_gather": 1, "all_reduce": 1} == naive["backward"]
    assert "WRONG" not in format_table(rows)
    report = " ".join(format_report(rows, 2, "gloo (CPU)").split())
    assert report.startswith("== Tensor-parallel blocks == ran:") and "8 query / 4 KV heads" in report
    assert "verdict: every block matches its unsharded reference" in report
    assert "each cost exactly one all-reduce forward and one backward" in report
    broken = [dict(r, backward={"all_reduce": 2}) if r["block"].startswith("attention") else r for r in rows]
    assert "UNEXPECTED collective counts" in format_report(broken, 2, "gloo (CPU)")


def test_count_collectives_restores_torch_distributed():
    original = dist.all_reduce
    with count_collectives() as counts:
        assert dist.all_reduce is not original
    assert dist.all_reduce is original and counts == {}


def test_bad_tp_size_is_rejected_before_launching():
    with pytest.raises(ParallelConfigError, match="valid tensor_parallel_size values are 1, 2, 4"):
        check_tp_size(3)
