"""Token parallelism end to end on gloo: TKNP 2, TKNP 4 and TP 2 x TKNP 2 against TP-only and transformers.

One 4-rank launch runs the three layouts in turn (TKNP 2 as two external-DP replicas). In each,
the roots serve two workloads with token parallelism (a batch of requests of different lengths,
and requests joining and finishing mid-run), for two architectures (Qwen2 and Llama), then
re-run them TP-only on a small cache (so some requests wait for a row). The parent checks
tokens and logits against that reference, against the TP 1 run and against transformers, and
checks the group layout, that workers hold no weights, and the memory accounting.
"""
from __future__ import annotations

import functools
import os

import pytest
import torch

from hybridpar.distributed.launcher import launch
from hybridpar.models.config import ModelConfig
from hybridpar.models.default_checkpoint import resolve_model
from hybridpar.radix.mem_pool import kv_bytes_per_token
from hybridpar.tknp.attention import AttentionGeometry
from hybridpar.tknp.memory import decoder_param_bytes, plan_memory, shape_of
from hybridpar.tknp.verify import default_paged_workload, default_workloads, hf_logits
from tests.tknp_workers import PagedCase, serve_layouts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ["qwen2-tiny", "llama-tiny"]
MAX_SEQ_LEN = 48
ATOL = 1e-4
WORKLOADS = default_workloads()


@functools.cache
def _config(name: str) -> ModelConfig:
    return ModelConfig.from_pretrained(resolve_model(name))


def _row_bytes(name: str, tp: int) -> int:
    g = AttentionGeometry.from_config(_config(name), tp, 0)
    return MAX_SEQ_LEN * kv_bytes_per_token(g.num_layers, g.num_kv_heads, g.head_dim, torch.float32)


def _budget(name: str, tp: int) -> int:
    """Per-rank budget leaving the root 2 cache rows after its weights (the workers get many more)."""
    return decoder_param_bytes(_config(name), tp) + 2 * _row_bytes(name, tp) + _row_bytes(name, tp) // 2


WORLD = 4
LAYOUTS = [(1, 4), (2, 2), (1, 2)]  # TKNP 2 runs as two replicas (external DP) of the 4-rank world
IDS = ["tknp4", "tp2xtknp2", "tknp2"]


# the paged / radix-cache checks of test_tknp_radix run in the same launch (one spawn of 4 ranks);
# each rank's budget is its share of the weights plus 1 MiB of KV (256 tokens at TP 1, 512 at TP 2)
PAGED = PagedCase(model="qwen2-tiny", layouts=((1, 2), (2, 2)),
                  budgets={tp: decoder_param_bytes(_config("qwen2-tiny"), tp) + (1 << 20) for tp in (1, 2)},
                  max_seq_len=64, workload=default_paged_workload(), page_size=8)


@functools.cache
def _launch() -> dict[tuple[int, int], list[dict]]:
    """Every layout's per-rank results (one launch for this module and test_tknp_radix)."""
    budgets = {tp: {m: _budget(m, tp) for m in MODELS} for tp in {tp for tp, _ in LAYOUTS}}
    per_rank = launch(serve_layouts, WORLD, LAYOUTS, MODELS, budgets, MAX_SEQ_LEN, WORKLOADS, PAGED,
                      backend="gloo", timeout=400)
    return {layout: [r[layout] for r in per_rank] for layout in LAYOUTS}


def _run(tp: int, tknp: int) -> list[dict]:
    """Results of the first replica of the layout, by rank (the other replicas must agree)."""
    results = _launch()[(tp, tknp)]
    size = tp * tknp
    for replica in range(1, WORLD // size):
        for a, b in zip(results[:tp], results[replica * size: replica * size + tp]):
            for model in MODELS:
                for w in WORKLOADS:
                    assert _same(a["models"][model]["outputs"][w.name], b["models"][model]["outputs"][w.name])
    return results[:size]


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
def test_groups(tp, tknp):
    size = tp * tknp
    for rank, r in enumerate(_launch()[(tp, tknp)]):
        g, base, t = r["groups"], rank // size * size, rank % tp
        assert g["tknp"] == [base + t + j * tp for j in range(tknp)]  # same TP rank across TKNP indices
        assert g["tp"] == list(range(rank // tp * tp, rank // tp * tp + tp))
        assert g["dp"] == [rank]  # DP groups have size 1 under TKNP
        assert g["is_root"] == (rank - base < tp) and g["tknp_rank"] == (rank - base) // tp
        assert g["initialized"] and g["layout_is"]


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("model", MODELS)
def test_tokens_and_logits_match_tp_only_tp1_and_transformers(tp, tknp, model):
    roots = [r["models"][model] for r in _run(tp, tknp)[:tp]]
    tp1 = _run(1, 2)[0]["models"][model]["reference"]
    for w in WORKLOADS:
        got = roots[0]["outputs"][w.name]
        assert all(_same(root["outputs"][w.name], got) for root in roots)  # TP roots agree
        for i, (out, req) in enumerate(zip(got, w.requests)):
            for ref in (roots[0]["reference"][w.name][i], tp1[w.name][i]):
                assert out["tokens"] == ref["tokens"], (w.name, i)
                assert (out["logits"] - ref["logits"]).abs().max() <= ATOL
            hf = hf_logits(model, req.prompt_ids, out["tokens"])
            assert (out["logits"] - hf).abs().max() <= ATOL, (w.name, i)
            assert hf.argmax(-1).tolist() == out["tokens"], (w.name, i)
            assert len(out["tokens"]) == req.sampling.max_new_tokens or out["reason"] == "eos"
    static = [o["tokens"] for o in roots[0]["outputs"][WORKLOADS[0].name]]
    assert roots[0]["generate"] == static  # the static-batch generate() agrees with the engine
    assert all(root["fallback_exact"] for root in roots)


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(x["tokens"] == y["tokens"] and torch.equal(x["logits"], y["logits"]) for x, y in zip(a, b))


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
def test_requests_spread_over_ranks_join_and_leave(tp, tknp):
    results = _run(tp, tknp)
    for model in MODELS:
        root = results[0]["models"][model]
        joining = root["outputs"]["joining"]
        assert len({o["admitted"] for o in joining}) > 2 and len({o["finished"] for o in joining}) > 2
        used = {o["rank"] for w in WORKLOADS for o in root["outputs"][w.name]}
        assert used == set(range(tknp))
        # each worker attended exactly the new tokens the root's steps placed on its TKNP rank
        for r in results[tp:]:
            k = r["groups"]["tknp_rank"]
            expected = sum(new[k] for w in WORKLOADS for _, new in root["history"][w.name])
            assert r["models"][model]["stats"]["new_tokens"] == expected
            assert r["models"][model]["stats"]["steps"] == sum(len(root["history"][w.name]) for w in WORKLOADS)


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
def test_workers_hold_no_weights_and_kv_adds_up(tp, tknp):
    results = _run(tp, tknp)
    for model in MODELS:
        config = _config(model)
        budget = _budget(model, tp)
        plan = plan_memory(shape_of(config), budget, tensor_parallel_size=tp, token_parallel_size=tknp,
                           bytes_per_param=4, bytes_per_elem=4, param_bytes=decoder_param_bytes(config, tp),
                           granularity=MAX_SEQ_LEN)
        for rank, r in enumerate(results):
            m = r["models"][model]
            if rank < tp:
                assert m["param_bytes"] == decoder_param_bytes(config, tp) and m["parameter_objects"] > 0
                cap = m["capacities"][0]
            else:
                assert m["parameter_objects"] == 0  # not a single nn.Parameter in a worker process
                cap = m["capacity"]
                assert cap.param_bytes == 0 and cap.num_slots > m["capacities"][0].num_slots
            assert cap.num_tokens == plan.ranks[rank].kv_tokens
            assert cap.kv_bytes == plan.ranks[rank].kv_bytes
        # the distinct tokens the deployment caches: one TP group per TKNP index, capacities add up
        by_index = [results[k * tp]["models"][model] for k in range(tknp)]
        measured = by_index[0]["capacities"][0].num_tokens + sum(m["capacity"].num_tokens for m in by_index[1:])
        assert measured == plan.kv_tokens_total


# ----------------------------------------------------------------------------- pure: splitting a batch
def test_split_batch_groups_tokens_by_rank_and_restores_the_order():
    from hybridpar.models.attention_backend import ContiguousKVCache
    from hybridpar.tknp.attention import TknpForwardBatch, split_batch

    cache = ContiguousKVCache(1, 1, 2, 4, 16)
    # requests: rank 1 (3 new tokens), rank 0 (1 decode token after 5), rank 1 (2), rank 2 (1 after 2)
    fb = TknpForwardBatch.build_placed(cache, [1, 0, 1, 2], [7, 3, 9, 4], [0, 5, 0, 2], [3, 1, 2, 1],
                                       out_cache_loc=torch.arange(100, 107))
    fb.rank_mem_ops = [[], [("rows.alloc", (1,), [9])], []]
    plan, order = split_batch(fb, 3)
    assert plan.split_sizes == [1, 5, 1]
    assert order.tolist() == [3, 0, 1, 2, 4, 5, 6]  # rank 0's token, rank 1's (requests 0 and 2), rank 2's
    one = plan.sub_batches[1]
    assert (one.req_pool_indices, one.prefix_lens, one.extend_lens) == ([7, 9], [0, 0], [3, 2])
    assert one.out_cache_loc.tolist() == [100, 101, 102, 104, 105] and one.mem_ops == [("rows.alloc", (1,), [9])]
    assert plan.sub_batches[0].mem_ops is None and plan.sub_batches[2].prefix_lens == [2]
    x = torch.arange(7) * 10
    grouped = x[order]
    restored = torch.empty_like(grouped)
    restored[order] = grouped
    assert torch.equal(restored, x)
    sub = plan.sub_batches[0].forward_batch(cache, torch.device("cpu"))
    assert sub.forward_mode.value == "decode" and sub.positions.tolist() == [5]
    assert split_batch(fb, 3)[0].sub_batches[2].forward_batch(cache, torch.device("cpu")).seq_lens == [3]


def test_split_batch_needs_the_placement():
    from hybridpar.models.attention_backend import ContiguousKVCache, ForwardBatch
    from hybridpar.tknp.attention import TknpForwardBatch, split_batch

    cache = ContiguousKVCache(1, 1, 2, 4, 16)
    with pytest.raises(ValueError, match="TknpForwardBatch"):
        split_batch(ForwardBatch.build(cache, [0], [0], [2]), 2)
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        split_batch(TknpForwardBatch.build_placed(cache, [2], [0], [0], [2]), 2)
    with pytest.raises(ValueError, match="2 tknp_ranks for 1 requests"):
        TknpForwardBatch.build_placed(cache, [0, 1], [0], [0], [2])
    empty = split_batch(TknpForwardBatch.build_placed(cache, [0], [0], [0], [2]), 2)[0].sub_batches[1]
    assert empty.num_tokens == 0 and empty.forward_batch(cache, torch.device("cpu")) is None


def test_logit_error_is_absolute_in_fp32_and_relative_in_low_precision():
    from hybridpar.tknp.verify import logit_error

    ref = torch.tensor([[3.0, 4.0], [0.0, 10.0]])
    got = ref + torch.tensor([[0.0, 0.5], [1.0, 0.0]])
    assert logit_error(got, ref, torch.float32) == pytest.approx(1.0)
    assert logit_error(got, ref, torch.bfloat16) == pytest.approx(0.1)  # 0.5 / 5 and 1 / 10


def test_bf16_verify_cli_passes_on_gloo(capsys):
    """TKNP 2 in bf16 against TP-only and transformers in bf16: tokens identical, the TP model's tolerance."""
    import json

    from hybridpar.tknp.verify import main

    assert main(["--token-parallel-size", "2", "--dtype", "bf16", "--backend", "gloo",
                 "--model-name", "qwen2-tiny"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["tokens_identical"]
    assert 0 < summary["max_abs_logit_diff_hf"] <= 2e-2
