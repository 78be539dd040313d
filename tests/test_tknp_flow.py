"""The token-parallel flow visualizer: its frames say what the placement, the scheduler's rule, the split
and the heads say, and a real TP 2 x TKNP 2 run of the engine's scheduler on gloo moves exactly the shapes
the frames show."""
from __future__ import annotations

import functools
import re

import pytest

from hybridpar import launch
from hybridpar.layers.linear import qkv_partition
from hybridpar.models.config import ModelConfig
from hybridpar.models.default_checkpoint import resolve_model
from hybridpar.roofline import MODEL_PRESETS
from hybridpar.tknp.attention import AttentionGeometry, TknpForwardBatch, split_batch
from hybridpar.tknp.memory import shape_of
from hybridpar.tknp.placement import RequestPlacer, place_all
from hybridpar.tknp.runner import TknpSetup
from hybridpar.viz.tknp_flow import (
    DEFAULT_REQUESTS,
    STAGES,
    FlowRequest,
    engine_requests,
    flow_frames,
    flow_html,
    random_requests,
    step_flow,
    tknp_flow_explorer,
    tknp_flow_widget,
)
from tests.tknp_flow_workers import flow_rank

LAYOUTS = [(1, 2), (2, 2), (1, 3), (1, 4), (4, 2)]
BATCHES = [DEFAULT_REQUESTS, random_requests(9, seed=3), random_requests(1, seed=0), random_requests(12, seed=7)]


def _shape(*dims: int) -> str:
    return "[" + ", ".join(map(str, dims)) + "]"


@pytest.mark.parametrize("tp,tknp", LAYOUTS)
@pytest.mark.parametrize("batch", range(len(BATCHES)))
def test_flow_is_the_placement_the_split_and_the_heads(tp: int, tknp: int, batch: int) -> None:
    requests = BATCHES[batch]
    flow = step_flow("tiny", tp, tknp, requests, max_new_tokens=8)
    shape = MODEL_PRESETS["tiny"]
    # placement: the placer's own greedy rule on the engine's reservations (prompt + max_new_tokens)
    assert list(flow.reservations) == [r.prompt_len + 8 for r in requests]
    assert list(flow.placement) == place_all(list(flow.reservations), tknp)
    placer = RequestPlacer(tknp)
    for i, cost in enumerate(flow.reservations):
        placer.place(i, cost)
    assert max(placer.loads) - min(placer.loads) <= max(flow.reservations)
    # the pass: a rank with a new request prefills its new requests only; the others decode all of theirs
    for r in range(tknp):
        held, new = flow.requests_on(r), [i for i in flow.requests_on(r) if requests[i].generated == 0]
        assert flow.running_on(r) == (new or held)
    assert sorted(flow.running + tuple(flow.waiting)) == list(range(len(requests)))
    # the split: split_batch on the same placed batch
    run = flow.running
    fb = TknpForwardBatch.build_placed(None, [flow.placement[i] for i in run], [flow.rows[i] for i in run],
                                       [requests[i].cached_tokens for i in run], [requests[i].new_tokens for i in run])
    plan, order = split_batch(fb, tknp)
    assert flow.split_sizes == plan.split_sizes
    assert list(flow.order) == order.tolist()
    assert flow.split_sizes == [sum(requests[i].new_tokens for i in flow.running_on(r)) for r in range(tknp)]
    assert flow.kv_tokens == [sum(requests[i].seq_len for i in flow.running_on(r)) for r in range(tknp)]
    for r in range(tknp):  # rows: the engine's next free row of the rank, in placement order
        assert [flow.rows[i] for i in flow.requests_on(r)] == list(range(len(flow.requests_on(r))))
    # heads: what QKVParallelLinear holds on every TP rank
    for t in range(tp):
        part = qkv_partition(shape.num_heads, shape.num_kv_heads, tp, t)
        assert (flow.heads[t].num_heads, flow.heads[t].num_kv_heads) == (part.num_heads, part.num_kv_heads)


@pytest.mark.parametrize("tp,tknp", LAYOUTS)
def test_frames_show_the_flow(tp: int, tknp: int) -> None:
    requests = random_requests(7, seed=tp * 10 + tknp)
    flow = step_flow("tiny", tp, tknp, requests)
    frames = flow_frames(flow)
    assert [f.stage for f in frames] == list(STAGES)
    T, d = flow.num_tokens, flow.model.head_dim
    batch, grouped = flow.token_requests(), flow.token_requests(grouped=True)
    assert sorted(grouped) == sorted(batch)
    assert [flow.placement[i] for i in grouped] == sorted(flow.placement[i] for i in grouped)  # grouped by rank
    restored = [0] * T
    for j, src in enumerate(flow.order):  # out[order] = grouped restores the batch
        restored[src] = grouped[j]
    assert restored == batch
    by_stage = {f.stage: f for f in frames}
    assert list(by_stage["plan"].tokens) == batch and list(by_stage["gather"].tokens) == batch
    assert list(by_stage["scatter"].tokens) == grouped and by_stage["rest"].tokens is None
    for frame in frames:
        assert len(frame.rows) == tp * tknp
        for row in frame.rows:
            c = flow.layout.coords(row.rank)
            assert (row.tp_rank, row.tknp_rank) == (c["tp"], c["tknp"])
            assert row.role == ("root" if c["tknp"] == 0 else "attention")
            assert list(row.requests) == flow.requests_on(row.tknp_rank)
    for row in by_stage["scatter"].rows:
        g = flow.heads[row.tp_rank]
        assert f"packed {_shape(flow.split_sizes[row.tknp_rank], g.num_heads + 2 * g.num_kv_heads, d)}" in row.holds
    for row in by_stage["attend"].rows:
        g = flow.heads[row.tp_rank]
        assert row.holds == f"o {_shape(flow.split_sizes[row.tknp_rank], g.num_heads, d)}"
        assert f"attends over {flow.kv_tokens[row.tknp_rank]} KV tokens" in row.does
    for row in by_stage["gather"].rows:
        g = flow.heads[row.tp_rank]
        if row.role == "root":
            assert row.holds.startswith(f"o {_shape(T, g.num_heads, d)}")
    roots = [r for r in by_stage["qkv"].rows if r.role == "root"]
    assert len(roots) == tp and all(f"packed {_shape(T, flow.heads[r.tp_rank].packed_heads, d)}" in r.holds
                                    for r in roots)
    # bytes per layer: the root sends packed q, k, v of the other ranks' tokens and receives their outputs
    g = flow.heads[0]
    others = T - flow.split_sizes[0]
    assert flow.scatter_bytes() == others * (g.num_heads + 2 * g.num_kv_heads) * d * 2
    assert flow.gather_bytes() == others * g.num_heads * d * 2


def test_html_and_widgets() -> None:
    flow = step_flow("tiny", 2, 2)
    page = flow_html(flow, "scatter")
    assert "TP 2 x TKNP 2" in page and "scatterv" in page
    assert len(re.findall(r"<tr style=", page)) == 4  # one row per global rank
    with pytest.raises(ValueError, match="unknown stage"):
        flow_html(flow, "allreduce")
    explorer = tknp_flow_explorer()
    layouts, stack = explorer.children[0].children[0], explorer.children[1]
    # no Play widget: in the book its view throws (theme's Font Awesome) and breaks the slider's links
    assert [type(w).__name__ for w in explorer.children[0].children] == ["Dropdown", "IntSlider"]
    assert len(stack.children) == len(layouts.options) == 3
    assert all(len(inner.children) == len(STAGES) for inner in stack.children)
    live = tknp_flow_widget(token_parallel_size=2)
    out = live.children[-1]
    assert "TKNP 2" in out.value
    live.children[0].children[1].value = 4  # TP 4 with TKNP 2: still valid for the tiny model
    assert "TP 4 x TKNP 2" in out.value
    live.children[0].children[0].value = "llama-7b"
    live.children[0].children[1].value = 1
    assert "llama-7b" in out.value


def test_bad_input_names_the_fix() -> None:
    with pytest.raises(ValueError, match="max_new_tokens"):
        step_flow("tiny", 1, 2, [FlowRequest(4, 9)], max_new_tokens=8)
    with pytest.raises(ValueError, match="tp_size|TP size|tensor"):
        step_flow("tiny", 3, 2)
    with pytest.raises(ValueError, match="prompt_len"):
        FlowRequest(0)
    with pytest.raises(ValueError, match="arrival order"):
        engine_requests(step_flow("tiny", 1, 2, [FlowRequest(3, 0), FlowRequest(4, 2)]))
    with pytest.raises(ValueError, match="arrived at the same step"):  # the later arrival delays its rank
        engine_requests(step_flow("tiny", 1, 2, [FlowRequest(3, 4), FlowRequest(4, 2), FlowRequest(5, 0)]))


def test_engine_requests_reach_the_pass() -> None:
    flow = step_flow("tiny", 1, 2)
    workload, step = engine_requests(flow)
    assert step == 4 and workload.arrival_steps == [0, 0, 0, 0, 0, 4]
    assert [len(p) for p in workload.prompts] == [r.prompt_len for r in DEFAULT_REQUESTS]
    assert [len(p) + sp.max_new_tokens for p, sp in zip(workload.prompts, workload.sampling)] == list(flow.reservations)
    assert all(sp.ignore_eos and sp.greedy for sp in workload.sampling)
    assert flow.waiting == [1, 2]  # rank 1 prefills r5 in this pass, so r1 and r2 wait


@functools.cache
def _real_run() -> tuple[object, int, list[dict]]:
    config = ModelConfig.from_pretrained(resolve_model("qwen2-tiny"))
    flow = step_flow(shape_of(config, "qwen2-tiny"), 2, 2)
    workload, step = engine_requests(flow, vocab_size=config.vocab_size)
    setup = TknpSetup(model_name="qwen2-tiny", tensor_parallel_size=2, token_parallel_size=2, max_seq_len=64)
    return flow, step, launch(flow_rank, 4, setup, workload, backend="gloo", timeout=300)


def test_a_real_tp2_tknp2_run_moves_the_frames_shapes() -> None:
    flow, step, ranks = _real_run()
    L = flow.model.num_layers
    assert flow.model.num_heads == MODEL_PRESETS["tiny"].num_heads  # the preset is the checkpoint's shape
    roots = [r for r in ranks if r["role"] == "root"]
    assert [r["tp_rank"] for r in roots] == [0, 1]
    for r in ranks:  # the real model's (and worker's) heads are the frame's
        g = flow.heads[r["tp_rank"]]
        assert r["heads"] == (g.num_heads, g.num_kv_heads)
    leader = roots[0]  # it decides (and logs) every pass; the other root replays them
    assert leader["placement"] == list(flow.placement) and leader["rows"] == list(flow.rows)
    the_pass = leader["passes"][step]
    reqs, new, kv = the_pass.per_rank(2)
    assert reqs == [len(flow.running_on(r)) for r in range(2)]
    assert new == flow.split_sizes and kv == flow.kv_tokens
    assert sorted(the_pass.rids) == sorted(leader["rids"][i] for i in flow.running)  # the waiting ones sit out
    assert roots[0]["tokens"] == roots[1]["tokens"]
    per_pass = [p.per_rank(2)[1] for p in leader["passes"]]  # new tokens of each TKNP rank, pass by pass
    for r in ranks:  # the local attention calls of the pass: q [n_r, Hq, d], k [n_r, Hkv, d] over kv_r tokens
        busy = [i for i, n in enumerate(per_pass) if n[r["tknp_rank"]] > 0]
        k = busy.index(step)
        calls = r["calls"][k * L:(k + 1) * L]
        g, n = flow.heads[r["tp_rank"]], flow.split_sizes[r["tknp_rank"]]
        assert len(r["calls"]) == len(busy) * L
        assert [c[0] for c in calls] == list(range(L))
        for _, q, kk, kv_tokens in calls:
            assert q == [n, g.num_heads, g.head_dim] and kk == [n, g.num_kv_heads, g.head_dim]
            assert kv_tokens == flow.kv_tokens[r["tknp_rank"]]


def test_geometry_of_a_preset_matches_the_checkpoint() -> None:
    config = ModelConfig.from_pretrained(resolve_model("qwen2-tiny"))
    for tp in (1, 2, 4):
        for rank in range(tp):
            real = AttentionGeometry.from_config(config, tp, rank)
            preset = AttentionGeometry.from_config(MODEL_PRESETS["tiny"], tp, rank)
            assert (real.num_heads, real.num_kv_heads, real.head_dim) == \
                   (preset.num_heads, preset.num_kv_heads, preset.head_dim)
