"""Rank functions for the token-parallel tests (importable, so spawned ranks can run them)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
from hybridpar.tknp.runner import TknpRoot, TknpSetup, Workload
from hybridpar.tknp.verify import PagedWorkload, verify_paged_rank, verify_rank


def _root_extras(root: TknpRoot, workloads: Sequence[Workload]) -> dict[str, Any]:
    """generate() on the first workload, and the exactness of the disabled wrapper."""
    first = workloads[0]
    prompts = [r.prompt_ids for r in first.requests]
    hidden = []
    for wrap in (False, True):  # one prefill through a bare cache and through TokenParallelAttention(group=None)
        cache = root.model.make_kv_cache(len(prompts), root.setup.max_seq_len)
        backend = TokenParallelAttention(cache, None, root.geometry) if wrap else cache
        fb = ForwardBatch.build(backend, cache.alloc(len(prompts)), [0] * len(prompts), [len(p) for p in prompts])
        ids = torch.tensor([t for p in prompts for t in p])
        with torch.no_grad():
            hidden.append(root.model(ids, fb.positions, fb))
    return {"generate": [o.token_ids for o in generate(root.model, prompts, first.requests[0].sampling)],
            "fallback_exact": torch.equal(hidden[0], hidden[1])}


@dataclass(frozen=True)
class PagedCase:
    """The paged (TknpScheduler) check to run on some layouts of the same launch."""

    model: str
    layouts: tuple[tuple[int, int], ...]
    budgets: dict[int, int]  # per TP size
    max_seq_len: int
    workload: PagedWorkload
    page_size: int


def serve_layouts(layouts: list[tuple[int, int]], models: list[str], budgets: dict[int, dict[str, int]],
                  max_seq_len: int, workloads: list[Workload], paged: PagedCase | None = None
                  ) -> dict[tuple[int, int], Any]:
    """Every rank, for each ``(tp, tknp)`` in turn: build the groups, run verify_rank per model (and
    verify_paged_rank on ``paged.layouts``), tear down.

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
            out["models"][name] = verify_rank(setup, workloads, reference_rows=3, extra=_root_extras)
        if paged is not None and (tp, tknp) in paged.layouts:
            setup = TknpSetup(model_name=paged.model, tensor_parallel_size=tp, token_parallel_size=tknp,
                              memory_budget_bytes=paged.budgets[tp], max_seq_len=paged.max_seq_len,
                              max_requests_per_rank=4)
            out["paged"] = verify_paged_rank(setup, paged.workload, paged.page_size)
        results[(tp, tknp)] = out
        destroy_model_parallel()
    return results
