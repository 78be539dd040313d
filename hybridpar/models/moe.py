"""The Qwen2-MoE sparse block: router, routed experts, shared expert with its sigmoid gate.

What transformers' ``Qwen2MoeSparseMoeBlock`` computes, per token ``x``::

    p        = softmax(gate(x))                      # router, over all experts, in float32
    w, ids   = top_k(p)  (/ sum(w) if norm_topk_prob)
    routed   = sum_j w_j * expert_{ids_j}(x)
    shared   = sigmoid(shared_expert_gate(x)) * shared_expert(x)
    out      = routed + shared

Under tensor parallelism (``ep_group=None``) the router and the shared gate are replicated, the
shared expert is a TP MLP whose down projection does *not* reduce, and the experts are
tensor-parallel: both partial sums are added and all-reduced **once**.

Under expert parallelism the tokens, replicated over the TP group, are split: TP rank ``r`` routes
the ``r``-th of ``tp`` contiguous chunks and sends its rows to the experts' owners over the EP group
(which spans TP, or TP x TKNP); each rank writes the routed output of its chunk into a zero
``[T, hidden]`` buffer, adds its shared-expert partial sum, and the same one all-reduce over TP
assembles both. Non-root token-parallel ranks hold no router and no shared expert: they only
serve their experts (:mod:`hybridpar.tknp.expert_worker`).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.distributed.communication_op import all_reduce_
from hybridpar.distributed.parallel_state import GroupCoordinator
from hybridpar.layers.fused_moe import FusedMoE, select_experts
from hybridpar.models.config import ModelConfig
from hybridpar.models.loader import default_weight_loader

# checkpoint "mlp.experts.{e}.{gate|up|down}_proj.weight" -> (FusedMoE parameter, (e, shard))
_EXPERT_KEY = re.compile(r"\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight$")
_EXPERT_SHARD = {"gate": ("w13_weight", "w1"), "up": ("w13_weight", "w3"), "down": ("w2_weight", "w2")}


def expert_param_name(checkpoint_name: str) -> tuple[str, tuple[int, str]] | None:
    """``model.layers.1.mlp.experts.5.up_proj.weight -> ("model.layers.1.mlp.experts.w13_weight", (5, "w3"))``;
    ``None`` for a tensor that is not a routed expert's."""
    m = _EXPERT_KEY.search(checkpoint_name)
    if m is None:
        return None
    param, shard = _EXPERT_SHARD[m.group(2)]
    return f"{checkpoint_name[:m.start()]}.mlp.experts.{param}", (int(m.group(1)), shard)


def make_experts(config: ModelConfig, layer_id: int, tp_group: GroupCoordinator, ep_group: GroupCoordinator | None,
                 dtype: torch.dtype) -> FusedMoE:
    moe = config.moe
    return FusedMoE(moe.num_experts, moe.top_k, config.hidden_size, moe.moe_intermediate_size, tp_group, ep_group,
                    dtype, layer_id)


class SparseMoeBlock(nn.Module):
    """One MoE layer on a rank that holds the dense weights (any rank without token parallelism, a
    TKNP root with it). ``shared_expert``: the decoder's TP MLP built with ``reduce_results=False``."""

    def __init__(self, config: ModelConfig, layer_id: int, tp_group: GroupCoordinator,
                 ep_group: GroupCoordinator | None, dtype: torch.dtype, shared_expert: nn.Module | None) -> None:
        super().__init__()
        moe = config.moe
        self.tp_group, self.top_k, self.renormalize = tp_group, moe.top_k, moe.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False, dtype=dtype)
        self.gate.weight.weight_loader = default_weight_loader
        self.experts = make_experts(config, layer_id, tp_group, ep_group, dtype)
        self.expert_parallel = self.experts.ep_group is not None
        self.shared_expert = shared_expert
        if shared_expert is not None:
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False, dtype=dtype)
            self.shared_expert_gate.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expert_parallel:
            chunks = torch.tensor_split(torch.arange(x.shape[0], device=x.device), self.tp_group.world_size)
            mine = chunks[self.tp_group.rank_in_group]
            w, ids = select_experts(self.gate(x[mine]), self.top_k, self.renormalize)
            out = torch.zeros_like(x)
            out[mine] = self.experts(x[mine], w, ids)
        else:
            w, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
            out = self.experts(x, w, ids)
        if self.shared_expert is not None:
            out = out + F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce_(out, self.tp_group)


class ExpertShard(nn.Module):
    """Only the routed experts of every sparse layer: what a rank holding no dense weights (a non-root
    token-parallel rank) keeps under expert parallelism. ``experts[str(layer)]`` is that layer's
    :class:`FusedMoE` over ``ep_group``; :meth:`load_weights` reads this rank's experts and nothing else."""

    def __init__(self, config: ModelConfig, tp_group: GroupCoordinator, ep_group: GroupCoordinator,
                 dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.experts = nn.ModuleDict({str(i): make_experts(config, i, tp_group, ep_group, dtype)
                                      for i in range(config.num_layers) if config.moe.is_sparse(i)})

    def load_weights(self, weights) -> dict[str, int]:
        loaded: dict[str, int] = {}
        for name, weight in weights:
            target = expert_param_name(name)
            if target is None:
                continue  # a dense or attention tensor: never read here
            param_name, shard = target
            layer = param_name.split(".")[2]
            param = getattr(self.experts[layer], param_name.rsplit(".", 1)[1])
            param.weight_loader(param, weight, shard)
            loaded[param_name] = loaded.get(param_name, 0) + 1
        return loaded


def weight_bytes(module: nn.Module) -> dict[str, int]:
    """Bytes of the weights this rank holds, split into routed ``experts`` and everything else (``dense``:
    embeddings, attention, norms, router, shared expert, LM head; tied weights counted once)."""
    out = {"experts": 0, "dense": 0}
    for name, p in module.named_parameters():
        out["experts" if name.endswith(("w13_weight", "w2_weight")) else "dense"] += p.numel() * p.element_size()
    return out
