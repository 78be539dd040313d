"""Rank functions for the token-parallel tests (importable, so spawned ranks can run them)."""
from __future__ import annotations

from typing import Any

import torch

from hybridpar.distributed.parallel_state import (
    get_dp_group,
    get_layout,
    get_tknp_group,
    get_tp_group,
    initialize_model_parallel,
    is_tknp_initialized,
    is_tknp_root,
)
from hybridpar.models.attention_backend import ForwardBatch
from hybridpar.models.generate import generate
from hybridpar.tknp.attention import TokenParallelAttention
from hybridpar.tknp.engine import RequestOutput, TknpEngine
from hybridpar.tknp.runner import TknpRoot, TknpSetup, Workload, build_worker, parameter_objects_alive


def _summary(outputs: list[RequestOutput]) -> list[dict[str, Any]]:
    return [{"tokens": o.token_ids, "logits": o.logits, "rank": o.tknp_rank, "admitted": o.admitted_step,
             "finished": o.finished_step, "reason": o.finish_reason} for o in outputs]


def _fallback_is_exact(root: TknpRoot, prompts: list[list[int]]) -> bool:
    """One prefill through a bare cache and through TokenParallelAttention(cache, group=None): bit-identical."""
    hidden = []
    for wrap in (False, True):
        cache = root.model.make_kv_cache(len(prompts), root.setup.max_seq_len)
        backend = TokenParallelAttention(cache, None, root.geometry) if wrap else cache
        fb = ForwardBatch.build(backend, cache.alloc(len(prompts)), [0] * len(prompts), [len(p) for p in prompts])
        ids = torch.tensor([t for p in prompts for t in p], device=fb.positions.device)
        with torch.no_grad():
            hidden.append(root.model(ids, fb.positions, fb))
    return torch.equal(hidden[0], hidden[1])


def serve_and_compare(models: list[str], tp: int, tknp: int, budgets: dict[str, int], max_seq_len: int,
                      workloads: list[Workload], reference_rows: int) -> dict[str, Any]:
    """Every rank: groups, then for each model a TKNP run (roots serve, workers attend) and, on the
    roots, a TP-only reference run of the same workloads on a small cache (so requests must wait)."""
    layout = initialize_model_parallel(tensor_parallel_size=tp, token_parallel_size=tknp)
    tknp_group = get_tknp_group()
    out: dict[str, Any] = {
        "groups": {"tp": get_tp_group().ranks, "tknp": tknp_group.ranks, "dp": get_dp_group().ranks,
                   "tknp_rank": tknp_group.rank_in_group, "is_root": is_tknp_root(),
                   "initialized": is_tknp_initialized(), "layout_is": layout == get_layout()},
        "models": {},
    }
    for name in models:
        setup = TknpSetup(name, tp, tknp, memory_budget_bytes=budgets[name], max_seq_len=max_seq_len)
        res: dict[str, Any] = {}
        if is_tknp_root():
            root = TknpRoot(setup)
            res.update(param_bytes=root.param_bytes, capacities=root.attn.capacities, outputs={}, history={})
            try:
                for w in workloads:
                    engine = root.engine(return_logits=w.return_logits)
                    res["outputs"][w.name] = _summary(engine.run(w.requests))
                    res["history"][w.name] = [(h.requests, h.new_tokens) for h in engine.history]
            finally:
                root.shutdown()
            local = root.model.make_kv_cache(reference_rows, max_seq_len)
            plain = TokenParallelAttention(local, None, root.geometry)
            res["reference"] = {w.name: _summary(TknpEngine(root.model, plain, return_logits=w.return_logits)
                                                 .run(w.requests)) for w in workloads}
            first = workloads[0]
            prompts = [r.prompt_ids for r in first.requests]
            res["generate"] = [o.token_ids for o in generate(root.model, prompts, first.requests[0].sampling)]
            res["fallback_exact"] = _fallback_is_exact(root, prompts)
            res["parameter_objects"] = parameter_objects_alive()
            del root, local, plain
        else:
            worker = build_worker(setup)
            res.update(capacity=worker.capacity, capacities=worker.capacities, stats=worker.serve().to_dict(),
                       parameter_objects=parameter_objects_alive())
        out["models"][name] = res
    return out
