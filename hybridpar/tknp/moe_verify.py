"""The MoE decoder against transformers under every way of spreading its experts (rank functions).

:func:`moe_sweep` runs in each of 4 ranks (``hybridpar.launch(moe_sweep, 4, ...)``) and checks one
checkpoint under TP 1 and TP 2 with tensor-parallel experts, TP 2 with expert parallelism (EP 2),
and TP 2 x TKNP 2 with TP experts on the roots and with EP 4 over all four ranks (non-roots run an
:class:`~hybridpar.tknp.expert_worker.ExpertWorker`). It returns the logits, greedy tokens, weight
bytes per rank and every dispatch's :class:`~hybridpar.layers.moe_dispatch.DispatchRecord`; the
reference (``hybridpar.models.verify.hf_reference``) runs in the parent. Used by ``tests/test_moe.py``
and chapter 10.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from hybridpar.distributed.parallel_state import (
    destroy_model_parallel,
    get_ep_group,
    get_tknp_group,
    get_tp_group,
    initialize_model_parallel,
    is_tknp_root,
)
from hybridpar.layers.fused_moe import FusedMoE
from hybridpar.models.attention_backend import ContiguousKVCache
from hybridpar.models.config import ModelConfig
from hybridpar.models.decoder import DecoderForCausalLM
from hybridpar.models.generate import generate, teacher_forced_logits
from hybridpar.models.loader import load_checkpoint
from hybridpar.models.moe import ExpertShard, weight_bytes
from hybridpar.core import SamplingParams
from hybridpar.tknp.attention import AttentionGeometry, TknpForwardBatch, TokenParallelAttention
from hybridpar.tknp.expert_worker import ExpertWorker
from hybridpar.tknp.worker import AttentionWorker


def _model(path: str, expert_parallel: bool) -> DecoderForCausalLM:
    config = ModelConfig.from_pretrained(path)
    model = DecoderForCausalLM(config, get_tp_group(), torch.float32, get_ep_group() if expert_parallel else None)
    load_checkpoint(model.eval(), path)
    return model


def _record(model: torch.nn.Module) -> list[list]:
    """Start recording every FusedMoE's dispatches; returns the per-layer record lists."""
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    for m in layers:
        m.records = []
    return [m.records for m in layers]


def _checks(model: DecoderForCausalLM, prompts: list[list[int]], continuations: list[list[int]]) -> dict[str, Any]:
    """Teacher-forced logits of the whole batch, greedy tokens, and the one-token batch (prompt 'H' alone)."""
    records = _record(model)
    logits = teacher_forced_logits(model, prompts, continuations)
    steps = [list(r) for r in records]
    greedy = generate(model, prompts, SamplingParams(max_new_tokens=len(continuations[0]), ignore_eos=True))
    for r in records:
        r.clear()
    one = teacher_forced_logits(model, prompts[-1:], [continuations[-1][:1]])
    return {"logits": logits, "tokens": [o.token_ids for o in greedy], "one_token": one[0],
            "records": steps, "one_token_records": [list(r) for r in records], "bytes": weight_bytes(model)}


@torch.no_grad()
def _tknp_logits(model: DecoderForCausalLM, backend: TokenParallelAttention, prompts: list[list[int]],
                 continuations: list[list[int]]) -> list[torch.Tensor]:
    """Teacher forcing through token-parallel attention: request ``i`` lives on TKNP rank ``i % k``."""
    k = backend.num_ranks
    ranks = [i % k for i in range(len(prompts))]
    rows = [i // k for i in range(len(prompts))]
    fb = TknpForwardBatch.build_placed(backend, ranks, rows, [0] * len(prompts), [len(p) for p in prompts])
    ids = torch.tensor([t for p in prompts for t in p])
    out = list(model.compute_logits(model(ids, fb.positions, fb)).split([len(p) for p in prompts]))
    for step in range(len(continuations[0])):
        prefix = [len(p) + step for p in prompts]
        fb = TknpForwardBatch.build_placed(backend, ranks, rows, prefix, [1] * len(prompts))
        ids = torch.tensor([c[step] for c in continuations])
        logits = model.compute_logits(model(ids, fb.positions, fb))
        out = [torch.cat([o, logits[i:i + 1]]) for i, o in enumerate(out)]
    return [o.float() for o in out]


def _tknp_pass(path: str, expert_parallel: bool, prompts: list[list[int]], continuations: list[list[int]],
               rows: int, max_len: int) -> dict[str, Any]:
    """One TP x TKNP layout: roots run the model, the others serve attention (and experts, under EP)."""
    config = ModelConfig.from_pretrained(path)
    tp, group = get_tp_group(), get_tknp_group()
    geometry = AttentionGeometry.from_config(config, tp.world_size, tp.rank_in_group, torch.float32)
    if is_tknp_root():
        model = _model(path, expert_parallel)
        records = _record(model)
        backend = TokenParallelAttention(model.make_kv_cache(rows, max_len), group, geometry)
        logits = _tknp_logits(model, backend, prompts, continuations)
        backend.shutdown()
        return {"logits": logits, "bytes": weight_bytes(model), "records": [list(r) for r in records]}
    cache = ContiguousKVCache(config.num_layers, geometry.num_kv_heads, config.head_dim, rows, max_len)
    if not expert_parallel:
        AttentionWorker(cache, geometry, group).serve()
        return {"bytes": {"experts": 0, "dense": 0}}
    shard = ExpertShard(config, tp, get_ep_group(), torch.float32)
    stats = load_checkpoint(shard, path)
    records = _record(shard)
    ExpertWorker(cache, geometry, group, shard).serve()
    return {"bytes": weight_bytes(shard), "bytes_read": stats.bytes_read, "records": [list(r) for r in records]}


LAYOUTS = ((1, 1, False), (2, 1, False), (2, 1, True), (2, 2, False), (2, 2, True))  # (tp, tknp, expert parallel)


def layout_key(tp: int, tknp: int, expert_parallel: bool) -> str:
    """``"tp2-ep"``, ``"tp2xtknp2-tp"``, ...: the layout and how its experts are spread."""
    return f"tp{tp}" + (f"xtknp{tknp}" if tknp > 1 else "") + ("-ep" if expert_parallel else "-tp")


def run_layout(path: str, prompts: list[list[int]], continuations: list[list[int]], tp: int, tknp: int = 1,
               expert_parallel: bool = False) -> dict[str, Any]:
    """Every rank: build the groups of one layout, check the model under it, tear the groups down.

    Without TKNP the first TP group returns the model outputs and every rank its weight bytes and
    dispatch records; with TKNP the roots' leader returns the logits (teacher forcing through
    token-parallel attention) and every rank its bytes and records."""
    initialize_model_parallel(tensor_parallel_size=tp, token_parallel_size=tknp)
    try:
        if tknp == 1:
            res = _checks(_model(path, expert_parallel), prompts, continuations)
            return res if dist.get_rank() < tp else {"bytes": res["bytes"], "records": res["records"]}
        rows = (len(prompts) + tknp - 1) // tknp
        max_len = max(len(p) + len(c) for p, c in zip(prompts, continuations))
        res = _tknp_pass(path, expert_parallel, prompts, continuations, rows, max_len)
        res["ep_ranks"] = get_ep_group().ranks
        return res
    finally:
        destroy_model_parallel()


def moe_sweep(path: str, prompts: list[list[int]], continuations: list[list[int]],
              layouts: tuple[tuple[int, int, bool], ...] = LAYOUTS) -> dict[str, Any]:
    """On 4 ranks, every layout of :data:`LAYOUTS` in turn (a smaller one runs as independent replicas):
    TP 1 and TP 2 with TP experts, TP 2 with EP 2, TP 2 x TKNP 2 with TP experts on the roots and
    with EP 4 over all four ranks. Returns ``{layout_key: run_layout(...)}``."""
    return {layout_key(*lay): run_layout(path, prompts, continuations, *lay) for lay in layouts}
