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

from hybridpar.distributed.parallel_state import GroupCoordinator
from hybridpar.models.attention_backend import AttentionBackend
from hybridpar.models.moe import ExpertShard
from hybridpar.tknp.attention import AttentionGeometry
from hybridpar.tknp.worker import AttentionWorker


class ExpertWorker(AttentionWorker):
    """An :class:`AttentionWorker` that also serves its experts (``shard``) in every sparse layer."""

    def __init__(self, backend: AttentionBackend, geometry: AttentionGeometry, group: GroupCoordinator,
                 shard: ExpertShard, device: torch.device | str = "cpu", mirror=None) -> None:
        super().__init__(backend, geometry, group, device, mirror)
        self.shard = shard

    def after_layer(self, layer_id: int) -> None:
        """A sparse layer's expert step: no tokens of its own, the roots' rows for its experts."""
        moe = self.shard.config.moe
        if moe.is_sparse(layer_id):
            g = self.geometry
            no_tokens = torch.empty(0, self.shard.config.hidden_size, dtype=g.dtype, device=self.device)
            no_routes = torch.empty(0, moe.top_k, dtype=torch.long, device=self.device)
            self.shard.experts[str(layer_id)](no_tokens, no_routes.to(g.dtype), no_routes)
