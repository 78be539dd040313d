"""Mixture of experts (Qwen2-MoE): the decoder equals transformers' Qwen2MoeForCausalLM at TP 1 and 2, with
tensor-parallel experts and with expert parallelism (EP 2 over TP 2, EP 4 over TP 2 x TKNP 2, where the
non-root token-parallel ranks hold experts but no dense weights). CPU, gloo, fp32; one launch of 4 ranks.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybridpar.config import ParallelConfigError  # noqa: E402
from hybridpar.distributed.launcher import launch  # noqa: E402
from hybridpar.layers.fused_moe import select_experts  # noqa: E402
from hybridpar.layers.moe_dispatch import DispatchPlan, imbalance  # noqa: E402
from hybridpar.models.config import ModelConfig  # noqa: E402
from hybridpar.models.default_checkpoint import default_model_path  # noqa: E402
from hybridpar.models.moe_config import check_moe_parallel  # noqa: E402
from hybridpar.models.verify import FP32_ATOL, hf_reference  # noqa: E402
from hybridpar.tknp.moe_verify import moe_sweep  # noqa: E402

NEW_TOKENS = 8
TEXTS = ["The capital of France is", "def f(x):", "Tensor parallelism splits every weight", "H"]
TP_MODES = ["tp1-tp", "tp2-tp", "tp2-ep"]


@pytest.fixture(scope="module")
def sweep():
    from transformers import AutoTokenizer

    path = default_model_path(name="qwen2-moe-tiny")
    tok = AutoTokenizer.from_pretrained(str(path))
    ref = hf_reference(path, [tok(t).input_ids for t in TEXTS], NEW_TOKENS)
    ref_one = hf_reference(path, [ref.prompts[-1]], 1)
    out = launch(moe_sweep, 4, str(path), ref.prompts, ref.continuations, backend="gloo", timeout=300)
    return ref, ref_one, out


def _max_err(logits, ref) -> float:
    return max((a - b).abs().max().item() for a, b in zip(logits, ref.logits))


@pytest.mark.parametrize("mode", TP_MODES)
def test_logits_and_greedy_tokens_match_transformers(sweep, mode):
    ref, ref_one, out = sweep
    res = out[0][mode]
    assert _max_err(res["logits"], ref) <= FP32_ATOL
    assert res["tokens"] == ref.continuations
    assert (res["one_token"] - ref_one.logits[0]).abs().max().item() <= FP32_ATOL


@pytest.mark.parametrize("mode", ["tp2xtknp2-tp", "tp2xtknp2-ep"])
def test_token_parallel_moe_matches_transformers(sweep, mode):
    ref, _, out = sweep
    logits = out[0][mode]["logits"]
    assert _max_err(logits, ref) <= FP32_ATOL
    assert [lg[len(p) - 1:-1].argmax(-1).tolist() for lg, p in zip(logits, ref.prompts)] == ref.continuations


def test_ep_group_spans_tp_times_tknp_and_experts_live_off_the_roots(sweep):
    _, _, out = sweep
    assert out[0]["tp2xtknp2-ep"]["ep_ranks"] == [0, 1, 2, 3]
    ep = [r["tp2xtknp2-ep"]["bytes"] for r in out]
    tp_only = [r["tp2xtknp2-tp"]["bytes"] for r in out]
    # non-roots (ranks 2, 3): experts, no dense weight; EP halves the roots' expert bytes
    assert all(b["dense"] == 0 and b["experts"] > 0 for b in ep[2:])
    assert all(b == {"experts": 0, "dense": 0} for b in tp_only[2:])
    assert len({b["experts"] for b in ep}) == 1 and ep[0]["experts"] * 2 == tp_only[0]["experts"]
    assert ep[0]["dense"] == tp_only[0]["dense"]
    assert out[2]["tp2xtknp2-ep"]["bytes_read"] == ep[2]["experts"]  # sharded reads: its experts only


def test_dispatch_records_add_up_and_empty_sends_happen(sweep):
    _, _, out = sweep
    # every row sent in EP 4 is received by exactly one rank; non-roots send nothing
    steps = [r["tp2xtknp2-ep"]["records"] for r in out]
    for layer in range(len(steps[0])):
        for step in range(len(steps[0][layer])):
            recs = [s[layer][step] for s in steps]
            assert [sum(r.send_sizes) for r in recs[2:]] == [0, 0]
            sent = torch.tensor([r.send_sizes for r in recs]).sum(0).tolist()
            assert sent == [sum(r.recv_sizes) for r in recs]
            assert sum(sent) == sum(r.tokens for r in recs) * 2  # top-2
    # the one-token batch at EP 2: TP rank 1 routes nothing, so it sends only empty pieces
    one = [r["tp2-ep"]["one_token_records"][0][0] for r in out[:2]]
    assert one[0].tokens == 1 and one[1].tokens == 0 and sum(one[1].send_sizes) == 0
    assert sum(one[0].send_sizes) == 2


def test_invalid_expert_parallel_sizes_are_rejected_before_spawning():
    moe = ModelConfig.from_pretrained(default_model_path(name="qwen2-moe-tiny")).moe
    with pytest.raises(ParallelConfigError, match=r"valid expert-parallel sizes for this model: 1, 2, 4, 8$"):
        check_moe_parallel(moe, 3, enable_expert_parallel=True)
    with pytest.raises(ParallelConfigError, match="tensor_parallel_size 2 x token_parallel_size 3"):
        check_moe_parallel(moe, 2, 3, enable_token_parallel=True, enable_expert_parallel=True)
    with pytest.raises(ParallelConfigError, match="moe_intermediate_size=32"):
        check_moe_parallel(moe, 3)
    check_moe_parallel(moe, 2, 2, enable_token_parallel=True, enable_expert_parallel=True)


@pytest.mark.parametrize("renormalize", [False, True])
def test_router_matches_transformers_top_k(renormalize):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    router = Qwen2MoeTopKRouter(Qwen2MoeConfig(hidden_size=16, num_experts=8, num_experts_per_tok=2,
                                               norm_topk_prob=renormalize))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(0))
    _, scores, ids = router(x)
    weights, mine = select_experts(x @ router.weight.T, 2, renormalize)
    assert torch.equal(mine, ids) and torch.allclose(weights, scores)


def test_dispatch_plan_and_imbalance():
    plan = DispatchPlan.build(torch.tensor([[0, 7], [1, 0]]), num_experts=8, ep_size=4)
    assert plan.send_sizes == [3, 0, 0, 1]
    assert plan.order.tolist() == [0, 3, 2, 1]
    assert imbalance(plan.expert_counts) == pytest.approx(2 / 0.5)
    assert imbalance([0, 0]) == 1.0


def test_engine_rejects_invalid_expert_parallel_layouts_before_spawning():
    from hybridpar.engine.config import EngineConfig

    bad = EngineConfig(model="hybridpar/qwen2-moe-tiny", tensor_parallel_size=2, token_parallel_size=3,
                       enable_token_parallel=True, enable_expert_parallel=True)
    with pytest.raises(ParallelConfigError, match="num_experts=8 is not divisible by the expert-parallel size 6"):
        bad.check()
    assert EngineConfig(model="hybridpar/qwen2-moe-tiny", tensor_parallel_size=2, token_parallel_size=2,
                        enable_token_parallel=True, enable_expert_parallel=True).check().moe.num_experts == 8


@pytest.mark.parametrize("layout", [{}, {"token_parallel_size": 2, "enable_token_parallel": True,
                                          "enable_expert_parallel": True}], ids=["tp2-tp-experts", "tp2xtknp2-ep4"])
def test_llm_serves_the_moe_model(sweep, layout):
    from hybridpar.core import SamplingParams
    from hybridpar.engine.llm import LLM

    ref = sweep[0]
    with LLM(model="hybridpar/qwen2-moe-tiny", tensor_parallel_size=2, backend="gloo", **layout) as llm:
        outs = llm.generate(ref.prompts, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == ref.continuations


def test_counted_all_to_all_bytes_match_the_recorded_splits(sweep):
    from hybridpar.models.moe_comm import counted_volume, expected_ep_volume, tp_experts_volume

    _, _, out = sweep
    step = [r["tp2xtknp2-ep"]["records"][0][0] for r in out]  # layer 0, prefill
    vol = counted_volume(step, tp=2)
    h, b, tokens = step[0].hidden_size, step[0].element_size, sum(r.tokens for r in step)
    sent = torch.tensor([r.send_sizes for r in step])
    remote = int(sent.sum() - sent.diagonal().sum())
    assert sum(vol.all_to_all) == 2 * remote * h * b  # every remote row goes out once and comes back once
    assert vol.all_reduce == tp_experts_volume(tokens, h, 2).all_reduce == tokens * h * b
    uniform = expected_ep_volume(tokens, h, 2, tp=2, ep=4)
    assert sum(uniform.all_to_all) == 2 * round(tokens * 2 * 3 / 4) * h * b


def test_routing_widget_draws_every_stage_of_every_layout():
    from hybridpar.viz.moe_dispatch import LAYOUTS, STAGES, moe_dispatch_explorer, moe_frames_html, moe_routing

    r = moe_routing(6, tp=2, tknp=2)
    assert [sum(row) for row in r.send_matrix()][2:] == [0, 0]  # non-roots route nothing
    assert sum(map(sum, r.send_matrix())) == 12
    frames = moe_frames_html(r)
    assert len(frames) == len(STAGES) and "empty" in frames[2] and "EP 4 over TP 2 x TKNP 2" in frames[0]
    box = moe_dispatch_explorer()
    assert len(box.children[1].children) == len(LAYOUTS)


def test_capacity_drops_overflow_and_pads_to_fixed_pieces():
    from hybridpar.layers.moe_dispatch import capacity_send_sizes, expert_capacity

    cap = expert_capacity(tokens=4, top_k=2, num_experts=8, capacity_factor=1.0)
    assert cap == 1
    sent, padded, dropped = capacity_send_sizes([3, 0, 1, 0, 2, 2, 0, 0], ep_size=2, capacity=cap)
    assert sent == [2, 2] and padded == [4, 4] and dropped == 4
    assert capacity_send_sizes([3, 0, 1, 0], 2, capacity=3) == ([3, 1], [6, 6], 0)


def test_predicted_weight_bytes_per_rank_equal_what_the_ranks_allocate(sweep):
    from hybridpar.tknp.moe_memory import moe_weight_bytes
    from hybridpar.tknp.moe_verify import LAYOUTS, layout_key

    _, _, out = sweep
    config = ModelConfig.from_pretrained(default_model_path(name="qwen2-moe-tiny"))
    for tp, tknp, ep in LAYOUTS:
        key = layout_key(tp, tknp, ep)
        assert moe_weight_bytes(config, tp, tknp, ep) == [r[key]["bytes"] for r in out[:tp * tknp]], key
