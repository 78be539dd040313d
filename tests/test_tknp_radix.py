"""Token parallelism over RadixAttention: a paged pool and a radix tree per TKNP rank (gloo, 4 ranks).

One launch runs TKNP 2 (as two external-DP replicas) and TP 2 x TKNP 2. The roots serve a
shared-prefix workload twice with :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` (all at
once, then arriving over time: the second run hits the prefixes the first left in each rank's
tree), then with a plain TPScheduler. Tokens must match that reference and transformers; each
worker's mirror pools must equal the root's bookkeeping of that rank.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from hybridpar.distributed.launcher import launch
from hybridpar.models.config import ModelConfig
from hybridpar.models.default_checkpoint import resolve_model
from hybridpar.radix.mem_pool import max_tokens_for_budget
from hybridpar.tknp.attention import AttentionGeometry
from hybridpar.tknp.memory import decoder_param_bytes
from hybridpar.tknp.verify import default_paged_workload, hf_logits
from tests.tknp_radix_workers import serve_radix_layouts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "qwen2-tiny"
LAYOUTS = [(1, 2), (2, 2)]
PAGE = 8
MAX_SEQ_LEN = 64
BUDGET = {1: 700_000, 2: 500_000}  # per rank: weights + KV
WORKLOAD = default_paged_workload()  # 2 groups x 3 prompts sharing a 24-token system prompt, staggered


@functools.cache
def _launch() -> list[dict]:
    return launch(serve_radix_layouts, 4, LAYOUTS, MODEL, BUDGET, MAX_SEQ_LEN, WORKLOAD, PAGE, backend="gloo",
                  timeout=300)


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=["tknp2", "tp2xtknp2"])
def test_paged_tknp_matches_tp_only_and_transformers(tp, tknp):
    ranks = [r[(tp, tknp)] for r in _launch()]
    roots = [r for i, r in enumerate(ranks) if i % (tp * tknp) < tp]
    leader = roots[0]
    for name in ("together", "joining"):
        assert all(r[name]["outputs"] == leader["reference"] for r in roots), name
        assert set(leader[name]["placement"]) == set(range(tknp))  # requests spread over the ranks
    for prompt, out in zip(WORKLOAD.prompts, leader["reference"]):
        assert hf_logits(MODEL, prompt, out).argmax(-1).tolist() == out
    # the first run left each rank's prompts in its own tree: the second run hits them
    assert sum(leader["joining"]["cached"]) > 0 and sum(leader["together"]["cached"]) == 0


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=["tknp2", "tp2xtknp2"])
def test_worker_mirrors_equal_the_root_bookkeeping_and_hold_no_weights(tp, tknp):
    ranks = [r[(tp, tknp)] for r in _launch()]
    size = tp * tknp
    config = ModelConfig.from_pretrained(resolve_model(MODEL))
    for i, r in enumerate(ranks):
        leader = ranks[i // size * size]
        g = AttentionGeometry.from_config(config, tp, i % tp)
        if i % size < tp:
            assert r["parameter_objects"] > 0
            assert r["pool_tokens"] == max_tokens_for_budget(BUDGET[tp] - decoder_param_bytes(config, tp),
                                                             g.num_layers, g.num_kv_heads, g.head_dim,
                                                             torch.float32, PAGE)
        else:
            tknp_rank = i % size // tp
            assert r["digest"] == leader["digests"][tknp_rank]
            assert r["parameter_objects"] == 0 and r["stats"]["new_tokens"] > 0
            assert r["capacity"].num_tokens == max_tokens_for_budget(BUDGET[tp], g.num_layers, g.num_kv_heads,
                                                                     g.head_dim, torch.float32, PAGE)
            assert r["capacity"].num_tokens > leader["pool_tokens"]  # no weights: more KV than the root
