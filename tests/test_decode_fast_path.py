"""The batched/static decode path (hybridpar.models.decode_attention, hybridpar.models.cuda_graph)."""
from __future__ import annotations

import pytest
import torch

import hybridpar
from hybridpar.models.attention_backend import attend
from hybridpar.models.cuda_graph import batch_buckets, length_buckets
from hybridpar.models.decode_attention import decode_attention, length_mask
from tests.decode_fast_path_workers import fast_path_worker, graph_vs_eager_worker


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4), (6, 1)])
def test_decode_attention_equals_per_request_reference(hq: int, hkv: int) -> None:
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    b, d, n_slots, width = 5, 16, 200, 40
    q = torch.randn(b, hq, d, generator=gen)
    k_flat, v_flat = torch.randn(n_slots, hkv, d, generator=gen), torch.randn(n_slots, hkv, d, generator=gen)
    slots = torch.randint(0, n_slots, (b, width), generator=gen)
    lens = torch.tensor([1, 40, 17, 3, 29])
    o = decode_attention(q, k_flat, v_flat, slots, length_mask(lens, slots.shape[1]), scaling=0.37)
    for i in range(b):
        n = int(lens[i])
        keys = k_flat[slots[i, :n]].transpose(0, 1)[None]
        values = v_flat[slots[i, :n]].transpose(0, 1)[None]
        ref = attend(q[i][None, :, None, :], keys, values, torch.ones(1, 1, 1, n, dtype=torch.bool), 0.37)[0, :, 0]
        torch.testing.assert_close(o[i], ref, rtol=1e-5, atol=1e-5)


def test_buckets() -> None:
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(5) == [1, 2, 4, 5]
    assert length_buckets(100) == [64, 100]
    assert length_buckets(1000) == [64, 128, 256, 512, 768, 1000]


def test_static_decode_path_matches_reference_tp2() -> None:
    """generate(use_cuda_graph=True) and TPScheduler(use_cuda_graph=True) run the static batched path on the
    CPU; tokens equal the per-request reference, logits to float32 rounding, under TP 2 (gloo)."""
    names = ["qwen2-tiny", "llama-tiny"]
    for tp in (2,):
        results = hybridpar.launch(fast_path_worker, tp, tp, names)
        for rank, rank_result in enumerate(results):
            for name in names:
                r = rank_result[name]
                assert not r["graph_mode"] and r["captures"] == 0  # CPU: eager static path
                assert all(len(t) == n for t, n in zip(r["ref_tokens"], (6, 3, 9, 12)))
                assert r["min_top2_gap"] > 1e-3  # no near-tie: equal tokens are a meaningful check
                assert r["fast_tokens"][0] == r["ref_tokens"] and r["fast_tokens"][1] == r["ref_tokens"]
                assert r["max_logit_diff"] < 1e-4, (tp, name, r["max_logit_diff"])
                assert r["sched_tokens"][0] == r["sched_tokens"][1] == r["ref_tokens"]
                # a steady decode copies nothing to the device: one load per batch (4, 3, 2, 1 requests);
                # generate: two calls of 11 decode steps, every rank reads its own greedy tokens
                assert r["gen_steps_loads"] == (22, 8)
                # the scheduler: rank 0 reads the tokens back and continues on the device; a follower,
                # which never reads them, loads its batch every step
                assert r["sched_steps_loads"] == (11, 4 if rank == 0 else 11), (rank, r["sched_steps_loads"])


@pytest.mark.gpu
@pytest.mark.parametrize("tp", [1, 2])
def test_cuda_graph_replay_equals_eager(tp: int) -> None:
    if torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} GPUs")
    for r in hybridpar.launch(graph_vs_eager_worker, tp, "llama-tiny", 6, 50, backend="nccl"):
        assert r["captures"] >= 2  # prompts of 5..20 tokens + 50 steps cross the 64-token length bucket
        assert r["same_tokens"]
        assert r["max_logit_diff"] < 0.05
