"""Rank function for tests/test_tknp_flow.py: a real TP x TKNP run on the engine's scheduler that records
every local attention call."""
from __future__ import annotations

from typing import Any

from hybridpar.distributed.parallel_state import get_tknp_group, get_tp_group, is_tknp_root
from hybridpar.tknp.runner import TknpSetup, Workload, build_paged_worker, build_scheduler, ensure_groups, serve_workload


def _record_calls(backend: Any) -> list[tuple[int, list[int], list[int], int]]:
    """Wrap this backend object's ``forward``: every call appends (layer, q shape, k shape, KV tokens read)."""
    calls: list[tuple[int, list[int], list[int], int]] = []
    forward = backend.forward

    def recorded(layer_id, q, k, v, forward_batch):
        calls.append((layer_id, list(q.shape), list(k.shape), sum(forward_batch.seq_lens)))
        return forward(layer_id, q, k, v, forward_batch)

    backend.forward = recorded
    return calls


def flow_rank(setup: TknpSetup, workload: Workload, page_size: int = 16) -> dict[str, Any]:
    """Every rank: serve ``workload`` (roots: the TknpScheduler, recording) or attention (workers), with
    every local attention call recorded; return the heads this rank uses, the calls, and (roots) the
    passes, the placement, the pool row and the tokens of each request."""
    ensure_groups(setup)
    base = {"tp_rank": get_tp_group().rank_in_group, "tknp_rank": get_tknp_group().rank_in_group}
    if not is_tknp_root():
        worker = build_paged_worker(setup, page_size)
        calls = _record_calls(worker.backend)
        worker.serve()
        g = worker.geometry
        return {**base, "role": "attention", "heads": (g.num_heads, g.num_kv_heads), "calls": calls}
    sched = build_scheduler(setup, page_size, record=True)
    attn = sched.model.model.layers[0].self_attn
    calls = _record_calls(sched.attn.local)  # the root's own pool: the requests placed on TKNP rank 0
    try:
        run = serve_workload(sched, workload)
    finally:
        sched.shutdown()
    rows = {}
    for p in run["passes"]:
        for rid, row in zip(p.rids, p.rows):
            rows.setdefault(rid, row)
    reqs = run["requests"]
    return {**base, "role": "root", "heads": (attn.num_heads, attn.num_kv_heads), "calls": calls,
            "passes": run["passes"], "placement": [o["rank"] for o in reqs],
            "rows": [rows.get(o["rid"]) for o in reqs], "rids": [o["rid"] for o in reqs],
            "tokens": [o["tokens"] for o in reqs]}
