"""AttentionWorker: a non-root TKNP rank. A KV cache and attention, no model.

The worker never builds the model, so it allocates no weight tensor at all: it needs only the
shape of the attention it computes (layers, its TP share of the heads, head size, dtype;
:class:`~hybridpar.tknp.attention.AttentionGeometry`) and a local
:class:`~hybridpar.models.attention_backend.AttentionBackend` holding its KV cache. Its whole
memory budget can go to that cache.

Its loop mirrors what :class:`~hybridpar.tknp.attention.TokenParallelAttention` does on the root::

    while (plan := broadcast_object(from root)) is not None:   # one PassPlan per forward pass
        replay my sub-batch's pool changes on my mirror pools   # paged caches only
        fb = my sub-batch as a ForwardBatch of my cache (None if I have no request this pass)
        for layer in range(num_layers):
            qkv = scatterv(..., plan.split_sizes)                 # my requests' new tokens
            o = local_backend.forward(layer, q, k, v, fb)         # stores K/V, attends
            gatherv(o, plan.split_sizes)                          # back to the root

Every rank takes part in every scatter and gather, even with zero tokens, because they are
collectives. A plan without any token (pool changes only) runs no layer, on any rank. ``None``
from the root ends the loop.

With a paged cache the root owns the *index* structures of this rank's pool (rows, page free
list, radix tree) and decides every allocation; the worker keeps a mirror of the rows and the
free list, kept exact by replaying the root's op log (:mod:`hybridpar.radix.pool_sync`), and the
K/V buffers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hybridpar.distributed.communication_op import broadcast_object, gatherv, scatterv
from hybridpar.distributed.parallel_state import GroupCoordinator
from hybridpar.models.attention_backend import AttentionBackend
from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.pool_sync import pool_digest, replay
from hybridpar.tknp.attention import (
    AttentionGeometry,
    KVCapacity,
    PassPlan,
    attend_piece,
    capacity_of,
    exchange_hello,
)


@dataclass
class WorkerStats:
    """What one attention worker did: passes served, new tokens attended, KV held."""

    steps: int = 0
    new_tokens: int = 0
    rows_used: set[int] = field(default_factory=set)
    peak_kv_tokens: int = 0  # largest sum of seq_lens of its requests in one pass

    def to_dict(self) -> dict:
        return {"steps": self.steps, "new_tokens": self.new_tokens, "rows_used": sorted(self.rows_used),
                "peak_kv_tokens": self.peak_kv_tokens}


class AttentionWorker:
    """Serves attention for the requests the TKNP root places on this rank.

    Constructing it is collective over ``group`` (it meets the root's
    :class:`~hybridpar.tknp.attention.TokenParallelAttention`); ``capacities`` then lists every
    rank's :class:`~hybridpar.tknp.attention.KVCapacity`. With a paged backend pass ``mirror``
    (its ``ReqToTokenPool`` and a ``TokenToKVPoolAllocator`` of the same size): the root keeps the
    real index structures of this rank's pool and sends their changes, which the worker replays
    (checked: a divergence raises) before attending.
    """

    def __init__(self, backend: AttentionBackend, geometry: AttentionGeometry, group: GroupCoordinator,
                 device: torch.device | str = "cpu", mirror: tuple[ReqToTokenPool, TokenToKVPoolAllocator] | None = None
                 ) -> None:
        if group.world_size < 2 or group.is_first_rank:
            raise ValueError(f"AttentionWorker runs on a non-root rank of a TKNP group of >= 2 ranks; this is group "
                             f"rank {group.rank_in_group} of {group.world_size}: use TokenParallelAttention on the root")
        self.backend, self.geometry, self.group, self.mirror = backend, geometry, group, mirror
        self.device = torch.device(device)
        self.capacity: KVCapacity = capacity_of(backend)
        self.capacities = exchange_hello(group, geometry, self.capacity)
        self.stats = WorkerStats()

    def pool_digest(self) -> dict:
        """Free pages, free rows and the ``req_to_token`` hash of the mirror pools (paged workers): equal to
        the root's bookkeeping of this rank after a workload (:meth:`TknpScheduler.rank_digests`)."""
        if self.mirror is None:
            raise RuntimeError("pool_digest needs a paged worker (built with mirror pools)")
        d = pool_digest(*self.mirror, torch.zeros(0, dtype=torch.bool))
        return {k: d[k] for k in ("free_pages", "free_rows", "req_to_token")}

    def serve(self) -> WorkerStats:
        """Run passes until the root shuts the group down; returns the statistics."""
        while True:
            plan = broadcast_object(None, src=0, group=self.group)
            if plan is None:
                return self.stats
            self.run_pass(plan)

    def after_layer(self, layer_id: int) -> None:
        """What this rank does after a layer's attention, in step with the root (nothing here; an
        :class:`~hybridpar.tknp.expert_worker.ExpertWorker` serves its experts)."""

    @torch.no_grad()
    def run_pass(self, plan: PassPlan) -> None:
        """One forward pass: every layer's scatter, local attention, gather."""
        mine = plan.sub_batches[self.group.rank_in_group]
        if mine.mem_ops:
            if self.mirror is None:
                raise RuntimeError("the root sent pool changes but this worker has no mirror pools (paged cache)")
            replay(mine.mem_ops, *self.mirror)
        sizes = plan.split_sizes
        if sum(sizes) == 0:  # a sync-only plan: pool changes, no forward pass
            return
        fb = mine.forward_batch(self.backend, self.device)
        if fb is not None:
            self.backend.init_forward_metadata(fb)
            self.stats.rows_used.update(mine.req_pool_indices)
            self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, sum(fb.seq_lens))
        g = self.geometry
        template = torch.empty(0, g.packed_heads, g.head_dim, dtype=g.dtype, device=self.device)
        for layer_id in range(g.num_layers):
            packed = scatterv(template, sizes, src=0, dim=0, group=self.group)
            o = attend_piece(self.backend, layer_id, packed, g, fb)
            gatherv(o, sizes, dst=0, dim=0, group=self.group)
            self.after_layer(layer_id)
        self.stats.steps += 1
        self.stats.new_tokens += mine.num_tokens
