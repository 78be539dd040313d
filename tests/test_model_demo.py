"""The generation demo under torchrun (the issue's command line), and the GPU check (2 GPUs, NCCL)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.torchrun_util import run_under_torchrun

ROOT = Path(__file__).resolve().parents[1]


def test_tp_generate_demo_under_torchrun_prints_from_rank_0():
    proc = run_under_torchrun(2, "-m", "hybridpar.demos.tp_generate", "--force-cpu", "--model-name",
                              "qwen2-tiny", "--max-new-tokens", "16", "The capital of France is", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Printed once (rank 0 only), 16 new tokens (no EOS in the way).
    lines = [line for line in proc.stdout.splitlines() if line.startswith("'The capital of France is' -> ")]
    assert len(lines) == 1 and lines[0].endswith("  [length]"), proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("model", ["qwen2-tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tp2_on_two_gpus_matches_transformers(model, dtype):
    """fp32: max |logit diff| <= 1e-4 and 32 identical greedy tokens; bf16: relative logit error <= 2e-2
    and the first 16 greedy tokens identical (see hybridpar.models.verify)."""
    from hybridpar.models.verify import format_result, verify

    result = verify(tp=2, dtype=dtype, backend="nccl", model_name=model)
    assert result.passed, format_result(result)
