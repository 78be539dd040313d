"""Rank function for tests/test_tknp_flow.py: a real TP x TKNP run that records every local attention call."""
from __future__ import annotations

from typing import Any

import torch

from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tknp_group, get_tp_group, is_tknp_root
from hybridpar.models.attention_backend import ContiguousKVCache, ForwardBatch
from hybridpar.tknp.attention import AttentionGeometry
from hybridpar.tknp.runner import TknpRoot, TknpSetup, Workload, cache_rows, ensure_groups
from hybridpar.tknp.worker import AttentionWorker


class RecordingCache(ContiguousKVCache):
    """A ContiguousKVCache that records, for every call, the layer, the q/k shapes and the KV tokens read."""

    calls: list[tuple[int, list[int], list[int], int]]

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        self.calls.append((layer_id, list(q.shape), list(k.shape), sum(forward_batch.seq_lens)))
        return super().forward(layer_id, q, k, v, forward_batch)


def _recording_cache(geometry: AttentionGeometry, rows: int, setup: TknpSetup) -> RecordingCache:
    cache = RecordingCache(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, rows, setup.max_seq_len,
                           dtype=geometry.dtype, device=current_device())
    cache.calls = []
    return cache


def flow_rank(setup: TknpSetup, workload: Workload) -> dict[str, Any]:
    """Every rank: serve ``workload`` (roots) or attention (workers) through recording caches; return
    the heads this rank's model or worker uses, every local attention call, and (roots) the engine's
    per-step history and where each request ran."""
    ensure_groups(setup)
    base = {"tp_rank": get_tp_group().rank_in_group, "tknp_rank": get_tknp_group().rank_in_group}
    if not is_tknp_root():
        from hybridpar.models.default_checkpoint import resolve_model
        from hybridpar.roofline import ModelShape

        config = ModelShape.from_hf_config(resolve_model(setup.model_name) / "config.json")
        tp = get_tp_group()
        geometry = AttentionGeometry.from_config(config, tp.world_size, tp.rank_in_group, setup.torch_dtype)
        cache = _recording_cache(geometry, cache_rows(setup, geometry, 0), setup)
        worker = AttentionWorker(cache, geometry, get_tknp_group(), current_device())
        worker.serve()
        return {**base, "role": "attention", "heads": (geometry.num_heads, geometry.num_kv_heads),
                "calls": cache.calls}
    root = TknpRoot(setup)
    attn = root.model.model.layers[0].self_attn
    local = root.attn.local
    cache = _recording_cache(root.geometry, local.max_batch_size, setup)
    root.attn.local = cache  # same shape as the cache it replaces, before any pass
    engine = root.engine()
    try:
        outputs = engine.run(workload.requests)
    finally:
        root.shutdown()
    return {**base, "role": "root", "heads": (attn.num_heads, attn.num_kv_heads), "calls": cache.calls,
            "history": [(h.step, h.requests, h.new_tokens, h.kv_tokens) for h in engine.history],
            "placement": [o.tknp_rank for o in outputs], "rows": [o.row for o in outputs],
            "tokens": [o.token_ids for o in outputs]}

