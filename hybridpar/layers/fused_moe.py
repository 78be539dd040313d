"""FusedMoE: the routed experts of one MoE layer, spread over ranks in one of two ways (vLLM's names).

All experts of a layer are stored in two stacked parameters, as vLLM stores them::

    w13_weight  [E_local, 2 I_local, hidden]   gate (w1) and up (w3) projections, fused
    w2_weight   [E_local, hidden, I_local]     down projection

* **Tensor-parallel experts** (``ep_group=None``): ``E_local = E`` and ``I_local = I / tp``: rank
  ``r`` holds rows ``[r I/tp, (r+1) I/tp)`` of every expert's gate and up and the same columns of
  its down projection, like a dense MLP under TP. Every rank runs every routed token through its
  slice of the chosen experts; the partial outputs are summed by the caller's one all-reduce.
* **Expert parallelism** (``ep_group`` given): ``E_local = E / ep`` whole experts, ``I_local = I``;
  rank ``r`` of the EP group owns experts ``[r E/ep, (r+1) E/ep)``. The tokens a rank holds travel
  to the owners of their experts and back (:func:`~hybridpar.layers.moe_dispatch.dispatch_combine`).

Loading: the checkpoint stores each expert separately (``mlp.experts.{e}.gate_proj.weight`` ...,
the Hugging Face layout); :meth:`FusedMoE.weight_loader` takes one of them with the shard id
``(e, "w1" | "w3" | "w2")`` and reads only this rank's part: a slice under TP, nothing at all for
an expert another EP rank owns.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.distributed.parallel_state import GroupCoordinator, ParallelConfigError
from hybridpar.layers.linear import LoadedWeight, _check_shape, _narrow, divide
from hybridpar.layers.moe_dispatch import DispatchRecord, dispatch_combine


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in float32 over the experts, keep the ``top_k`` largest; ``renormalize`` (the model's
    ``norm_topk_prob``) rescales them to sum to 1. Returns ``(topk_weights, topk_ids)``, each ``[t, top_k]``."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), ids


def run_experts(rows: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``y[i] = down_e(silu(gate_e(rows[i])) * up_e(rows[i]))`` with ``e = expert_ids[i]`` (local ids)."""
    y = rows.new_empty(rows.shape[0], w2.shape[1])
    for e in torch.unique(expert_ids).tolist():
        sel = (expert_ids == e).nonzero().squeeze(1)
        gate, up = F.linear(rows[sel], w13[e]).chunk(2, dim=-1)
        y[sel] = F.linear(F.silu(gate) * up, w2[e])
    return y


class FusedMoE(nn.Module):
    """The routed experts of one layer. ``forward(x, topk_weights, topk_ids)`` returns this rank's
    *unreduced* contribution: a partial sum over the TP group (TP experts), or the full routed
    output of the tokens in ``x`` (expert parallelism: ``x`` is this rank's share of the tokens)."""

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int,
                 tp_group: GroupCoordinator, ep_group: GroupCoordinator | None = None,
                 params_dtype: torch.dtype | None = None, layer_id: int = 0) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.layer_id = num_experts, top_k, layer_id
        self.ep_group = ep_group if ep_group is not None and ep_group.world_size > 1 else None
        if ep_group is not None:
            ep, ep_rank = ep_group.world_size, ep_group.rank_in_group
            if num_experts % ep:
                raise ParallelConfigError(f"num_experts={num_experts} is not divisible by the expert-parallel size "
                                          f"{ep}; check the layout with hybridpar.models.moe_config.check_moe_parallel")
            self.num_local_experts = num_experts // ep
            self.first_expert = ep_rank * self.num_local_experts
            self.intermediate_per_rank, self.tp_size, self.tp_rank = intermediate_size, 1, 0
        else:
            self.num_local_experts, self.first_expert = num_experts, 0
            self.tp_size, self.tp_rank = tp_group.world_size, tp_group.rank_in_group
            self.intermediate_per_rank = divide(intermediate_size, self.tp_size, "moe_intermediate_size")
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        dtype = params_dtype or torch.get_default_dtype()
        i = self.intermediate_per_rank
        self.w13_weight = nn.Parameter(torch.zeros(self.num_local_experts, 2 * i, hidden_size, dtype=dtype),
                                       requires_grad=False)
        self.w2_weight = nn.Parameter(torch.zeros(self.num_local_experts, hidden_size, i, dtype=dtype),
                                      requires_grad=False)
        for p in (self.w13_weight, self.w2_weight):
            p.weight_loader = self.weight_loader
            p.checkpoint_parts = num_experts * (2 if p is self.w13_weight else 1)  # tensors it consumes
        self.records: list[DispatchRecord] | None = None  # set to [] to record every step

    def owns(self, expert_id: int) -> bool:
        return self.first_expert <= expert_id < self.first_expert + self.num_local_experts

    def weight_loader(self, param: nn.Parameter, loaded: LoadedWeight, shard_id: tuple[int, str]) -> None:
        """Copy this rank's part of expert ``shard_id[0]``'s ``w1`` (gate), ``w3`` (up) or ``w2`` (down)."""
        expert, which = shard_id
        h, full, i = self.hidden_size, self.intermediate_size, self.intermediate_per_rank
        _check_shape(loaded, (h, full) if which == "w2" else (full, h), f"expert {expert} {which}")
        if not self.owns(expert):
            return  # another EP rank's expert: not read at all
        local = expert - self.first_expert
        if which == "w2":
            param.data[local].copy_(_narrow(loaded, 1, self.tp_rank * i, i))
        else:
            param.data[local].narrow(0, 0 if which == "w1" else i, i).copy_(_narrow(loaded, 0, self.tp_rank * i, i))

    def local_experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        return run_experts(rows, local_ids, self.w13_weight, self.w2_weight)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.ep_group is not None:
            return dispatch_combine(x, topk_weights, topk_ids, self.num_experts, self.local_experts, self.ep_group,
                                    self.layer_id, self.records)
        t, k = topk_ids.shape
        token = torch.arange(t, device=x.device).repeat_interleave(k)
        y = self.local_experts(x[token], topk_ids.reshape(-1))
        out = torch.zeros_like(x)
        out.index_add_(0, token, y * topk_weights.reshape(-1, 1).to(y.dtype))
        if self.records is not None:
            counts = torch.bincount(topk_ids.reshape(-1), minlength=self.num_experts).tolist()
            self.records.append(DispatchRecord(self.layer_id, t, counts, [0], [0], x.shape[1], x.element_size()))
        return out

    def extra_repr(self) -> str:
        mode = "expert-parallel" if self.ep_group is not None else f"tensor-parallel (tp={self.tp_size})"
        return (f"{mode}: experts {self.first_expert}..{self.first_expert + self.num_local_experts - 1} of "
                f"{self.num_experts}, intermediate {self.intermediate_per_rank} of {self.intermediate_size}")
