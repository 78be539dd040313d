"""Token parallelism on GPUs with NCCL (the lead runs these; skipped without 2 GPUs)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from hybridpar.tknp.verify import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tknp2_on_nccl_matches_tp1_and_transformers(capsys):
    """`python -m hybridpar.tknp.verify --token-parallel-size 2 --backend nccl`: TKNP 2 on 2 GPUs against
    TP 1 (token parallelism off, same root GPU) and transformers: same greedy tokens, logits within 1e-4."""
    code = main(["--token-parallel-size", "2", "--backend", "nccl"])
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["ok"], out
    assert summary["backend"] == "nccl" and summary["tokens_identical"]
    assert summary["max_abs_logit_diff_tp"] <= 1e-4 and summary["max_abs_logit_diff_hf"] <= 1e-4
    workers = [r for r in summary["ranks"] if r["role"] == "attention"]
    assert workers and all(r["param_bytes"] == 0 and r["parameter_objects"] == 0 for r in workers)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 CUDA GPUs")
def test_tp2_x_tknp2_on_nccl_matches_tp2():
    from hybridpar.tknp.verify import format_result, verify

    result = verify(tensor_parallel_size=2, token_parallel_size=2, backend="nccl")
    assert result.ok, format_result(result)
