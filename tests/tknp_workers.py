"""Rank functions for the token-parallel tests (importable, so spawned ranks can run them)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hybridpar.distributed.parallel_state import (
    destroy_model_parallel,
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
from hybridpar.tknp.radix_scheduler import TknpScheduler
from hybridpar.tknp.runner import TknpSetup
from hybridpar.tknp.verify import Workload, verify_rank


def _root_extras(sched: TknpScheduler, workloads: Sequence[Workload]) -> dict[str, Any]:
    """generate() (chapter 4's fixed batch) on the first workload, and the exactness of the disabled wrapper."""
    first = workloads[0]
    model, prompts = sched.model, first.prompts
    hidden = []
    for wrap in (False, True):  # one prefill through a bare cache and through TokenParallelAttention(group=None)
        cache = model.make_kv_cache(len(prompts), sched.max_context_len)
        backend = TokenParallelAttention(cache, None, sched.geometry) if wrap else cache
        fb = ForwardBatch.build(backend, cache.alloc(len(prompts)), [0] * len(prompts), [len(p) for p in prompts])
        ids = torch.tensor([t for p in prompts for t in p])
        with torch.no_grad():
            hidden.append(model(ids, fb.positions, fb))
    return {"generate": [o.token_ids for o in generate(model, prompts, first.sampling[0])],
            "fallback_exact": torch.equal(hidden[0], hidden[1])}


def serve_layouts(layouts: list[tuple[int, int]], models: list[str], budgets: dict[int, dict[str, int]],
                  max_seq_len: int, workloads: list[Workload], page_size: int) -> dict[tuple[int, int], Any]:
    """Every rank, for each ``(tp, tknp)`` in turn: build the groups, run verify_rank per model, tear down.

    One launch covers several layouts (spawning ranks is the slow part on a small CPU box); a
    layout smaller than the world runs as independent replicas (external DP).
    """
    results = {}
    for tp, tknp in layouts:
        layout = initialize_model_parallel(tensor_parallel_size=tp, token_parallel_size=tknp)
        group = get_tknp_group()
        out: dict[str, Any] = {
            "groups": {"tp": get_tp_group().ranks, "tknp": group.ranks, "dp": get_dp_group().ranks,
                       "tknp_rank": group.rank_in_group, "is_root": is_tknp_root(),
                       "initialized": is_tknp_initialized(), "layout_is": layout == get_layout()},
            "models": {},
        }
        for name in models:
            setup = TknpSetup(model_name=name, tensor_parallel_size=tp, token_parallel_size=tknp,
                              memory_budget_bytes=budgets[tp][name], max_seq_len=max_seq_len)
            out["models"][name] = verify_rank(setup, workloads, page_size, reference_rows=3, extra=_root_extras)
        results[(tp, tknp)] = out
        destroy_model_parallel()
    return results
