"""Memory accounting of TP, DP and TKNP (pure arithmetic; measured numbers are checked in test_tknp_attention)."""
from __future__ import annotations

import os

import pytest

from hybridpar.roofline import ModelShape, kv_bytes_per_token, weight_bytes
from hybridpar.tknp.memory import (
    compare_strategies,
    decoder_param_bytes,
    format_memory_table,
    plan_memory,
    rank_kv_tokens,
    shape_of,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
GB = 10**9
LLAMA3_8B = ModelShape("llama3-8b", 4096, 14336, 32, 32, 8, 128, 128256)


def test_rank_kv_tokens():
    assert rank_kv_tokens(1000, 200, 16) == 50
    assert rank_kv_tokens(1000, 200, 16, granularity=16) == 48
    assert rank_kv_tokens(100, 200, 16) == 0  # the weights alone do not fit
    with pytest.raises(ValueError):
        rank_kv_tokens(100, 0, 0)
    with pytest.raises(ValueError):
        rank_kv_tokens(100, 0, 16, reserved_tokens=-1)


@pytest.mark.parametrize("budget", [0, 15 * 64, 16 * 64, 33 * 64 + 5, 1_000_000])
def test_reserved_page_is_how_the_engine_sizes_a_paged_pool(budget):
    """granularity = reserved = page size: exactly max_tokens_for_budget (page 0 paid for, never handed out)."""
    import torch

    from hybridpar.radix.mem_pool import kv_bytes_per_token as pool_bytes_per_token
    from hybridpar.radix.mem_pool import max_tokens_for_budget

    per_token = pool_bytes_per_token(2, 2, 4, torch.float32)  # 64 bytes
    for page in (1, 8, 16):
        expected = max_tokens_for_budget(budget, 2, 2, 4, torch.float32, page)
        assert rank_kv_tokens(budget, 0, per_token, granularity=page, reserved_tokens=page) == expected
    assert rank_kv_tokens(16 * 64, 0, 64, granularity=16, reserved_tokens=16) == 0  # one page: page 0 only


def test_tknp_roots_hold_the_weights_workers_hold_none():
    plan = plan_memory(LLAMA3_8B, 80 * GB, tensor_parallel_size=2, token_parallel_size=4)
    assert [r.role for r in plan.ranks] == ["tknp-root"] * 2 + ["tknp-attention"] * 6
    w = int(weight_bytes(LLAMA3_8B, 2))
    assert [r.param_bytes for r in plan.ranks] == [w] * 2 + [0] * 6
    per_token = int(kv_bytes_per_token(LLAMA3_8B, 2))
    assert plan.ranks[0].kv_tokens == (80 * GB - w) // per_token
    assert plan.ranks[7].kv_tokens == 80 * GB // per_token
    # owners are the TP groups; the deployment caches one root pair plus three worker pairs
    assert plan.owners == ((0, 1), (2, 3), (4, 5), (6, 7))
    assert plan.kv_tokens_total == plan.ranks[0].kv_tokens + 3 * plan.ranks[7].kv_tokens
    assert plan.max_request_tokens == plan.ranks[7].kv_tokens


def test_tknp_beats_dp_and_matches_tp_when_kv_heads_split_evenly():
    tp, dp, tknp = compare_strategies(LLAMA3_8B, 8, 80 * GB)
    assert (tp.label, dp.label, tknp.label) == ("TP8", "DP8", "TKNP8")
    assert tknp.total_param_bytes == dp.total_param_bytes // 8
    assert tknp.kv_tokens_total > dp.kv_tokens_total
    # 8 KV heads over 8 ranks: TP and TKNP cache about the same number of tokens (TP holds 8 copies
    # of the replicated norms, so a few tokens fewer)
    assert 0 <= tknp.kv_tokens_total - tp.kv_tokens_total <= 1e-4 * tp.kv_tokens_total
    # but a single request can use all of TP's pool, only one rank's under TKNP
    assert tp.max_request_tokens == tp.kv_tokens_total > tknp.max_request_tokens


def test_tknp_beats_tp_when_tp_must_replicate_kv_heads():
    tp, dp, tknp = compare_strategies(LLAMA3_8B, 16, 80 * GB)  # 16 ranks > 8 KV heads
    assert tp.ranks[0].kv_bytes_per_token == tknp.ranks[0].kv_bytes_per_token // 8
    assert tknp.kv_tokens_total > 1.9 * tp.kv_tokens_total


def test_impossible_tp_is_reported_not_raised():
    qwen = ModelShape.preset("qwen2.5-0.5b")  # 14 heads: TP 4 cannot split them
    tp, dp, tknp = compare_strategies(qwen, 4, 24 * GB)
    assert tp.error and "14" in tp.error and not tp.ranks
    assert tknp.kv_tokens_total > dp.kv_tokens_total
    table = format_memory_table([tp, dp, tknp])
    assert "TP4" in table and "impossible" in table and "TKNP4" in table and "tknp-attention" in table
    with pytest.raises(ValueError, match="multiple"):
        compare_strategies(qwen, 4, GB, tknp_tensor_parallel_size=3)


@pytest.mark.parametrize("name", ["qwen2-tiny", "llama-tiny", "qwen3-tiny"])
@pytest.mark.parametrize("tp", [1, 2])
def test_decoder_param_bytes_is_the_config_count_plus_vocab_padding(name, tp):
    from hybridpar.layers.vocab_parallel_embedding import pad_vocab_size
    from hybridpar.models.config import ModelConfig
    from hybridpar.models.default_checkpoint import resolve_model

    config = ModelConfig.from_pretrained(resolve_model(name))
    padding_rows = pad_vocab_size(config.vocab_size, 64, 1) - config.vocab_size
    copies = 1 if config.tie_word_embeddings else 2
    full = (config.num_parameters() + copies * padding_rows * config.hidden_size) * 4
    assert decoder_param_bytes(config, 1) == full
    if tp == 2:  # sharded: less than the whole, more than half (replicated norms, padding)
        assert full // 2 < decoder_param_bytes(config, 2) < full
    assert shape_of(config).num_kv_heads == config.num_kv_heads
