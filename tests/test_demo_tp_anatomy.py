"""hybridpar.demos.tp_anatomy on 4 gloo ranks (qwen2-tiny-copy: 4 query heads, 2 KV heads, so KV heads are
replicated; the trained default has 4 KV heads, one per rank at TP 4): recorded reads against the layers'
own sharding rules, bytes per load format, and the collectives of one prefill. One launch for the whole
file."""
from __future__ import annotations

import pytest

from hybridpar.demos.tp_anatomy import anatomy_verdict, format_collectives, format_loads, index_ranges, run_anatomy
from hybridpar.layers.linear import qkv_partition
from hybridpar.layers.vocab_parallel_embedding import vocab_shard
from hybridpar.viz.model_shards import checkpoint_ownership

TP = 4


@pytest.fixture(scope="module")
def results() -> list:
    return run_anatomy("qwen2-tiny-copy", tp_size=TP, backend="gloo")


def test_index_ranges() -> None:
    assert index_ranges(slice(None), (5, 3)) == ((0, 5), (0, 3))
    assert index_ranges((slice(None), slice(2, 3)), (5, 3)) == ((0, 5), (2, 3))
    with pytest.raises(TypeError, match="contiguous slices"):
        index_ranges((slice(0, 4, 2),), (5,))


def test_reads_follow_the_sharding_rules(results: list) -> None:
    assert [r.rank for r in results] == list(range(TP))
    owners = {o.name: o for o in checkpoint_ownership([r.reads for r in results])}
    hd = 16  # qwen2-tiny-copy: hidden 64 / 4 heads
    for rank in range(TP):
        part = qkv_partition(4, 2, TP, rank)
        k = owners["model.layers.1.self_attn.k_proj.weight"]
        assert k.ranges_of(rank) == [(part.kv_head_start * hd, (part.kv_head_start + 1) * hd)]
        q = owners["model.layers.0.self_attn.q_proj.bias"]
        assert q.ranges_of(rank) == [(part.q_head_start * hd, (part.q_head_start + 1) * hd)]
        shard = vocab_shard(259, rank, TP)
        expected = [(shard.start, shard.org_end)] if shard.num_org_rows else []
        assert owners["model.embed_tokens.weight"].ranges_of(rank) == expected
    assert owners["model.layers.0.self_attn.k_proj.weight"].segments[0].ranks == (0, 1)  # replicated KV head
    assert owners["model.layers.0.mlp.down_proj.weight"].split == "columns"
    assert owners["model.norm.weight"].split == "whole"


def test_sharded_reads_less_than_full(results: list) -> None:
    for r in results:
        sharded, full = r.loads
        assert (sharded.mode, full.mode) == ("sharded", "full")
        assert full.bytes_read == full.checkpoint_bytes
        assert sharded.bytes_read < full.bytes_read / 2
        assert sharded.bytes_read == sum(read.nbytes for t in r.reads.values() for read in t.reads)
    assert "sharded" in format_loads(results)


def test_two_all_reduces_per_layer(results: list) -> None:
    calls = results[0].collectives
    assert all(r.collectives == calls for r in results)
    assert [(c.module, c.collective) for c in calls] == [
        ("model.embed_tokens", "all_reduce"),
        ("model.layers.0.self_attn.o_proj", "all_reduce"), ("model.layers.0.mlp.down_proj", "all_reduce"),
        ("model.layers.1.self_attn.o_proj", "all_reduce"), ("model.layers.1.mlp.down_proj", "all_reduce"),
        ("lm_head", "all_gather"),
    ]
    tokens = results[0].num_tokens
    assert calls[0].shape == (tokens, 64) and calls[-1].shape == (1, 512 // TP)  # padded vocabulary slice
    assert "every rank called" in format_collectives(results)
    verdict = anatomy_verdict(results)
    assert "one prefill called 5 all-reduces (2 per layer, 1 for the embedding) and 1 all-gather" in verdict
    assert verdict.endswith("on every rank, in the same order.") and "full loading 100 %" in verdict


@pytest.mark.gpu
def test_nccl_two_ranks_same_anatomy() -> None:
    """On 2 GPUs: same reads and the same collectives (NCCL gathers with all_gather_into_tensor)."""
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    results = run_anatomy("qwen2-tiny-copy", tp_size=2, backend="nccl")
    calls = [(c.module, c.collective) for c in results[0].collectives]
    assert calls[0] == ("model.embed_tokens", "all_reduce") and len(calls) == 6
    assert calls[-1] == ("lm_head", "all_gather_into_tensor")
    owners = {o.name: o for o in checkpoint_ownership([r.reads for r in results])}
    assert owners["model.layers.0.self_attn.k_proj.weight"].ranges_of(1) == [(16, 32)]
    assert all(r.loads[0].bytes_read < r.loads[1].bytes_read for r in results)
