"""ExpertWorker: a non-root TKNP rank of an MoE model. KV cache, attention and some experts; no dense weight.

With token parallelism the root of each TKNP group holds the dense and attention weights and runs
the model; the other ranks hold only KV cache (:class:`~hybridpar.tknp.worker.AttentionWorker`).
An MoE model's experts are most of its weights, so they go where the memory is: the expert-parallel
group spans TP x TKNP (:func:`~hybridpar.distributed.parallel_state.expert_parallel_groups`) and
every rank of it, non-roots included, owns ``E / (tp * tknp)`` whole experts. A non-root rank
therefore holds experts but no attention or dense weights.

Per forward pass it follows the root layer by layer::

    for layer in range(num_layers):
        scatterv / attend / gatherv                    # as an AttentionWorker
        if layer is sparse: dispatch_combine(no tokens) # serve the rows routed to my experts

It routes no token of its own (it has no hidden states): it sends empty pieces and receives the
roots' rows for its experts, then returns their results.
"""

from __future__ import annotations

import torch

from hybridpar.distributed.communication_op import gatherv, scatterv
from hybridpar.distributed.parallel_state import GroupCoordinator
from hybridpar.models.attention_backend import AttentionBackend
from hybridpar.models.moe import ExpertShard
from hybridpar.radix.pool_sync import replay
from hybridpar.tknp.attention import AttentionGeometry, PassPlan, attend_piece
from hybridpar.tknp.worker import AttentionWorker


class ExpertWorker(AttentionWorker):
    """An :class:`AttentionWorker` that also serves its experts (``shard``) in every sparse layer."""

    def __init__(self, backend: AttentionBackend, geometry: AttentionGeometry, group: GroupCoordinator,
                 shard: ExpertShard, device: torch.device | str = "cpu", mirror=None) -> None:
        super().__init__(backend, geometry, group, device, mirror)
        self.shard = shard

    @torch.no_grad()
    def run_pass(self, plan: PassPlan) -> None:
        """AttentionWorker's pass, with each sparse layer's expert step after the layer's attention."""
        mine = plan.sub_batches[self.group.rank_in_group]
        if mine.mem_ops:
            replay(mine.mem_ops, *self.mirror)
        sizes = plan.split_sizes
        if sum(sizes) == 0:
            return
        fb = mine.forward_batch(self.backend, self.device)
        if fb is not None:
            self.backend.init_forward_metadata(fb)
            self.stats.rows_used.update(mine.req_pool_indices)
            self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, sum(fb.seq_lens))
        g, moe = self.geometry, self.shard.config.moe
        template = torch.empty(0, g.packed_heads, g.head_dim, dtype=g.dtype, device=self.device)
        no_tokens = torch.empty(0, self.shard.config.hidden_size, dtype=g.dtype, device=self.device)
        no_routes = torch.empty(0, moe.top_k, dtype=torch.long, device=self.device)
        for layer_id in range(g.num_layers):
            packed = scatterv(template, sizes, src=0, dim=0, group=self.group)
            gatherv(attend_piece(self.backend, layer_id, packed, g, fb), sizes, dst=0, dim=0, group=self.group)
            if moe.is_sparse(layer_id):
                self.shard.experts[str(layer_id)](no_tokens, no_routes.to(g.dtype), no_routes)
        self.stats.steps += 1
        self.stats.new_tokens += mine.num_tokens
