"""Token parallelism over RadixAttention: a paged pool and a radix tree per TKNP rank (gloo, 4 ranks).

Runs inside the 4-rank launch of test_tknp_attention (TKNP 2 as two external-DP replicas, and
TP 2 x TKNP 2). The roots serve a shared-prefix workload twice with
:class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` (all at once, then arriving over time: the
second run hits the prefixes the first left in each rank's tree), then with a plain TPScheduler.
Tokens must match that reference and transformers; each worker's mirror pools must equal the
root's bookkeeping of that rank.
"""
from __future__ import annotations

import os

import pytest
import torch

from hybridpar.models.config import ModelConfig
from hybridpar.models.default_checkpoint import resolve_model
from hybridpar.radix.mem_pool import max_tokens_for_budget
from hybridpar.tknp.attention import AttentionGeometry
from hybridpar.tknp.memory import decoder_param_bytes
from hybridpar.tknp.verify import hf_logits
from tests.test_tknp_attention import PAGED, _launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IDS = ["tknp2", "tp2xtknp2"]


def _ranks(tp: int, tknp: int) -> list[dict]:
    return [r["paged"] for r in _launch()[(tp, tknp)]]


@pytest.mark.parametrize("tp,tknp", PAGED.layouts, ids=IDS)
def test_paged_tknp_matches_tp_only_and_transformers(tp, tknp):
    ranks = _ranks(tp, tknp)
    roots = [r for i, r in enumerate(ranks) if i % (tp * tknp) < tp]
    leader = roots[0]
    assert all(r["fallback"] == r["reference"] for r in roots)  # TknpScheduler without a group == TPScheduler
    for name in ("together", "joining"):
        assert all(r[name]["outputs"] == leader["reference"] for r in roots), name
        assert set(leader[name]["placement"]) == set(range(tknp))  # requests spread over the ranks
    for prompt, out in zip(PAGED.workload.prompts, leader["reference"]):
        assert hf_logits(PAGED.model, prompt, out).argmax(-1).tolist() == out
    # the first run left each rank's prompts in its own tree: the second run hits them
    assert sum(leader["joining"]["cached"]) > 0 and sum(leader["together"]["cached"]) == 0


@pytest.mark.parametrize("tp,tknp", PAGED.layouts, ids=IDS)
def test_worker_mirrors_equal_the_root_bookkeeping_and_hold_no_weights(tp, tknp):
    ranks = _ranks(tp, tknp)
    size, budget, page = tp * tknp, PAGED.budgets[tp], PAGED.page_size
    config = ModelConfig.from_pretrained(resolve_model(PAGED.model))
    for i, r in enumerate(ranks):
        leader = ranks[i // size * size]
        g = AttentionGeometry.from_config(config, tp, i % tp)
        if i % size < tp:
            assert r["parameter_objects"] > 0
            assert r["pool_tokens"] == max_tokens_for_budget(budget - decoder_param_bytes(config, tp), g.num_layers,
                                                             g.num_kv_heads, g.head_dim, torch.float32, page)
        else:
            assert r["digest"] == leader["digests"][i % size // tp]
            assert r["parameter_objects"] == 0 and r["stats"]["new_tokens"] > 0
            assert r["capacity"].num_tokens == max_tokens_for_budget(budget, g.num_layers, g.num_kv_heads, g.head_dim,
                                                                     torch.float32, page)
            assert r["capacity"].num_tokens > leader["pool_tokens"]  # no weights: more KV than the root
