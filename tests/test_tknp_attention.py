"""Token parallelism end to end on gloo: TKNP 2, TKNP 4 and TP 2 x TKNP 2 against TP-only and transformers.

One 4-rank launch runs the three layouts in turn (TKNP 2 as two external-DP replicas). In each,
the roots run the engine's TKNP scheduler (:class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`,
a paged pool and a radix tree per TKNP rank) on four workloads (a batch of requests of different
lengths, requests joining and finishing mid-run, shared-prefix prompts twice), for two
architectures (Qwen2 and Llama), then serve them TP-only with room for 3 requests at a time (so
some wait) (:func:`hybridpar.tknp.verify.verify_rank`). The parent checks tokens and logits against
that reference, against the TP 1 run and against transformers, and checks the group layout, that
workers hold no weights, and the memory accounting. test_tknp_radix checks the radix caches of the
same launch.
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
from hybridpar.tknp.verify import default_workloads, hf_logits
from tests.tknp_workers import serve_layouts

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ["qwen2-tiny", "llama-tiny"]
MAX_SEQ_LEN = 48
PAGE = 8
ATOL = 1e-4
WORKLOADS = default_workloads()


@functools.cache
def _config(name: str) -> ModelConfig:
    return ModelConfig.from_pretrained(resolve_model(name))


def _bytes_per_token(name: str, tp: int) -> int:
    g = AttentionGeometry.from_config(_config(name), tp, 0)
    return kv_bytes_per_token(g.num_layers, g.num_kv_heads, g.head_dim, torch.float32)


def _budget(name: str, tp: int) -> int:
    """Per-rank budget leaving the root 2.5 requests of MAX_SEQ_LEN tokens after its weights (the workers
    get many more)."""
    return decoder_param_bytes(_config(name), tp) + 5 * MAX_SEQ_LEN * _bytes_per_token(name, tp) // 2


WORLD = 4
LAYOUTS = [(1, 4), (2, 2), (1, 2)]  # TKNP 2 runs as two replicas (external DP) of the 4-rank world
IDS = ["tknp4", "tp2xtknp2", "tknp2"]


@functools.cache
def _launch() -> dict[tuple[int, int], list[dict]]:
    """Every layout's per-rank results (one launch for this module and test_tknp_radix)."""
    budgets = {tp: {m: _budget(m, tp) for m in MODELS} for tp in {tp for tp, _ in LAYOUTS}}
    per_rank = launch(serve_layouts, WORLD, LAYOUTS, MODELS, budgets, MAX_SEQ_LEN, WORKLOADS, PAGE,
                      backend="gloo", timeout=500)
    return {layout: [r[layout] for r in per_rank] for layout in LAYOUTS}


def _tokens(run: dict) -> list[list[int]]:
    return [o["tokens"] for o in run["requests"]]


def _run(tp: int, tknp: int) -> list[dict]:
    """Results of the first replica of the layout, by rank (the other replicas must agree)."""
    results = _launch()[(tp, tknp)]
    size = tp * tknp
    for replica in range(1, WORLD // size):
        for a, b in zip(results[:tp], results[replica * size: replica * size + tp]):
            for model in MODELS:
                for w in WORKLOADS:
                    assert _tokens(a["models"][model]["runs"][w.name]) == _tokens(b["models"][model]["runs"][w.name])
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
    leader = roots[0]
    tp1 = _run(1, 2)[0]["models"][model]["reference"]
    for w in WORKLOADS:
        got = leader["runs"][w.name]["requests"]
        assert all(_tokens(root["runs"][w.name]) == _tokens(leader["runs"][w.name]) for root in roots)  # TP roots agree
        for root in roots:  # TknpScheduler without a group serves exactly like TPScheduler
            assert _tokens(root["fallback"][w.name]) == _tokens(root["reference"][w.name])
        for i, (out, prompt, sp) in enumerate(zip(got, w.prompts, w.sampling)):
            assert out["logits"].shape[0] == len(out["tokens"])  # one recorded distribution per sampled token
            for ref in (leader["reference"][w.name]["requests"][i], tp1[w.name]["requests"][i]):
                assert out["tokens"] == ref["tokens"], (w.name, i)
                assert (out["logits"] - ref["logits"]).abs().max() <= ATOL
            hf = hf_logits(model, prompt, out["tokens"])
            assert (out["logits"] - hf).abs().max() <= ATOL, (w.name, i)
            assert hf.argmax(-1).tolist() == out["tokens"], (w.name, i)
            assert len(out["tokens"]) == sp.max_new_tokens or out["reason"] == "eos"
    assert leader["generate"] == _tokens(leader["runs"][WORKLOADS[0].name])  # the fixed-batch generate() agrees
    assert all(root["fallback_exact"] for root in roots)


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
def test_requests_spread_over_ranks_join_and_leave(tp, tknp):
    results = _run(tp, tknp)
    for model in MODELS:
        root = results[0]["models"][model]
        joining = root["runs"]["joining"]
        first = {rid: k for k, p in reversed(list(enumerate(joining["passes"]))) for rid in p.rids}
        last = {rid: k for k, p in enumerate(joining["passes"]) for rid in p.rids}
        assert len(set(first.values())) > 2 and len(set(last.values())) > 2  # requests join and leave mid-run
        used = {o["rank"] for w in WORKLOADS for o in root["runs"][w.name]["requests"]}
        assert used == set(range(tknp))
        passes = [p for w in WORKLOADS for p in root["runs"][w.name]["passes"]]
        rank_of = {o["rid"]: o["rank"] for w in WORKLOADS for o in root["runs"][w.name]["requests"]}
        assert all(rank_of[rid] == r for p in passes for rid, r in zip(p.rids, p.tknp_ranks))  # never moves
        # each worker ran every pass, and attended exactly the new tokens the root's passes placed on its TKNP rank
        for r in results[tp:]:
            k = r["groups"]["tknp_rank"]
            assert r["models"][model]["stats"]["new_tokens"] == sum(p.per_rank(tknp)[1][k] for p in passes) > 0
            assert r["models"][model]["stats"]["steps"] == len(passes)


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
def test_workers_hold_no_weights_and_kv_adds_up(tp, tknp):
    """Every rank's pool is what the memory plan predicts for the engine's paged pools (whole pages, page 0
    reserved), from the same per-rank budget: a worker, holding no weights, gets more KV than a root."""
    results = _run(tp, tknp)
    for model in MODELS:
        config = _config(model)
        plan = plan_memory(shape_of(config), _budget(model, tp), tensor_parallel_size=tp, token_parallel_size=tknp,
                           bytes_per_param=4, bytes_per_elem=4, param_bytes=decoder_param_bytes(config, tp),
                           granularity=PAGE, reserved_tokens=PAGE)
        for rank, r in enumerate(results):
            m = r["models"][model]
            if rank < tp:
                assert m["param_bytes"] == decoder_param_bytes(config, tp) and m["parameter_objects"] > 0
                cap = m["capacities"][0]
                assert m["pool_tokens"] == cap.num_tokens
            else:
                assert m["parameter_objects"] == 0  # not a single nn.Parameter in a worker process
                cap = m["capacity"]
                assert cap.param_bytes == 0 and cap.num_tokens > m["capacities"][0].num_tokens
                assert m["capacities"][r["groups"]["tknp_rank"]] == cap  # the root learnt it at the hello
            assert cap.num_tokens == plan.ranks[rank].kv_tokens
            assert cap.kv_bytes == (plan.ranks[rank].kv_tokens + PAGE) * plan.ranks[rank].kv_bytes_per_token
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


def _fake_rank(tokens: list[list[int]], logits: float, role: str = "root", **extra) -> dict:
    reqs = [{"tokens": t, "rank": 0, "cached": 0, "logits": torch.full((len(t), 4), logits)} for t in tokens]
    run = {"requests": reqs, "passes": []}
    return {"role": role, "runs": {"w": run}, "reference": {"w": run}, "fallback": {"w": run},
            "parameter_objects": 0, **extra}


def test_check_ranks_fails_on_any_difference():
    """The parent's check is not vacuous: other tokens, logits off by more than atol, a worker whose mirror
    differs from the root's bookkeeping or that holds parameters each make it fail."""
    from hybridpar.tknp.verify import VerifyResult, Workload, check_ranks
    from hybridpar.tknp.runner import TknpSetup

    w = [Workload("w", [[1, 2], [3]], [None, None], [0, 0])]

    def ok(ranks: list[dict]) -> bool:
        result = VerifyResult(True, TknpSetup(token_parallel_size=2), "gloo")
        check_ranks(result, "m", ranks, w, 1, False, 1e-4, torch.float32)
        return result.ok

    root = _fake_rank([[5, 6], [7]], 0.0, digests=["d0", "d1"])
    worker = {"role": "attention", "digest": "d1", "parameter_objects": 0}
    assert ok([root, worker])
    other = dict(root, reference={"w": _fake_rank([[5, 6], [8]], 0.0)["runs"]["w"]})
    assert not ok([other, worker])  # a token differs from TP alone
    drift = dict(root, reference={"w": _fake_rank([[5, 6], [7]], 1e-3)["runs"]["w"]})
    assert not ok([drift, worker])  # the logits differ by more than atol
    assert not ok([root, dict(worker, digest="d0")])  # the worker's mirror is not rank 1's bookkeeping
    assert not ok([root, dict(worker, parameter_objects=1)])  # a worker holds a parameter


def test_verify_rank_needs_token_parallelism():
    from hybridpar.tknp.runner import TknpSetup
    from hybridpar.tknp.verify import default_workloads, verify_rank

    with pytest.raises(ValueError, match="token_parallel_size must be >= 2"):
        verify_rank(TknpSetup(tensor_parallel_size=2), default_workloads())


def test_bf16_verify_cli_passes_on_gloo(capsys):
    """TKNP 2 in bf16 against TP-only and transformers in bf16: tokens identical, the TP model's tolerance."""
    import json

    from hybridpar.tknp.verify import main

    assert main(["--token-parallel-size", "2", "--dtype", "bf16", "--backend", "gloo",
                 "--model-name", "qwen2-tiny"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["dtype"] == "bfloat16" and summary["tokens_identical"]
    assert 0 < summary["max_abs_logit_diff_hf"] <= 2e-2


def test_low_precision_runs_may_leave_the_reference_only_at_a_near_tie():
    import torch

    from hybridpar.tknp.verify import tokens_agree

    logits = torch.zeros(3, 5)
    logits[:, 1] = 10.0
    logits[1, 2] = 9.9  # position 1: tokens 1 and 2 tie within 2 % of the largest logit
    assert tokens_agree([1, 1, 1], [1, 1, 1], logits, torch.bfloat16) == (True, 3)
    assert tokens_agree([1, 2, 4], [1, 1, 1], logits, torch.bfloat16) == (True, 2)  # compare positions 0..1
    assert tokens_agree([1, 2, 4], [1, 1, 1], logits, torch.float32) == (False, 0)  # fp32: no ties forgiven
    assert tokens_agree([3, 1, 1], [1, 1, 1], logits, torch.bfloat16) == (False, 0)  # a clear winner was missed
