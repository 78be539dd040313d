"""Expert parallelism's dispatch and combine: two all-to-alls of variable sizes, and what they moved.

Every rank of the EP group holds ``E / ep`` whole experts (rank ``r`` owns experts
``[r E/ep, (r+1) E/ep)``) and some tokens of its own (possibly none). One MoE step::

    rows     = every (token, choice) pair of my tokens, sorted by expert   # t * top_k rows
    counts   = rows per expert                                             # [E], mine
    all_to_all(counts)        -> recv_counts[src][e]: rows src sends to my expert e
    all_to_all_v(x[rows])     -> the rows my experts must process (split sizes from the counts)
    y = my experts(received rows)
    all_to_all_v(y)           -> back to the ranks the rows came from (the reverse split sizes)
    out[token] += weight * y  (combine)

The counts go first because the receiver must size its buffer: an all-to-all of variable sizes
needs both ends to know every split. A rank whose tokens pick none of my experts sends me an
empty piece; a rank with no tokens (a non-root token-parallel rank) sends only empty pieces
and still serves the rows that others send to its experts.

:class:`DispatchRecord` keeps what one step moved (per-expert counts, send and receive sizes
per rank), so load balance is visible: :func:`imbalance` is ``max / mean`` of the per-expert
token counts (1.0: perfectly balanced). :func:`capacity_send_sizes` shows what a per-expert capacity
would do to the pieces: drop the overflow, or pad every piece to a fixed size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridpar.distributed.parallel_state import GroupCoordinator


@dataclass
class DispatchRecord:
    """One MoE step on one rank. Sizes are rows (a row is one token's hidden vector)."""

    layer_id: int
    tokens: int  # tokens this rank routed
    expert_counts: list[int]  # rows this rank sent to each expert (all E experts)
    send_sizes: list[int]  # rows sent to each EP rank (dispatch; the combine sends them back)
    recv_sizes: list[int]  # rows received from each EP rank
    hidden_size: int = 0
    element_size: int = 4
    rank: int = 0  # this rank's index in the EP group (its own piece never leaves it)

    def bytes_sent(self) -> int:
        """Bytes leaving this rank in dispatch + combine: its rows to other ranks, then their results back."""
        remote = sum(self.send_sizes) - self.send_sizes[self.rank] + sum(self.recv_sizes) - self.recv_sizes[self.rank]
        return remote * self.hidden_size * self.element_size


def imbalance(counts: list[int] | torch.Tensor) -> float:
    """``max / mean`` of per-expert token counts; 1.0 when balanced (and for no tokens at all)."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    return 1.0 if c.sum() == 0 else float(c.max() / c.mean())


@dataclass(frozen=True)
class DispatchPlan:
    """Pure bookkeeping of one rank's dispatch: which rows go where (no communication)."""

    order: torch.Tensor  # [t*k] flat (token, choice) indices sorted by expert (stable)
    expert_counts: torch.Tensor  # [E] int64 rows per expert
    send_sizes: list[int]  # rows per EP rank

    @classmethod
    def build(cls, topk_ids: torch.Tensor, num_experts: int, ep_size: int) -> DispatchPlan:
        flat = topk_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=num_experts)
        per_rank = counts.view(ep_size, num_experts // ep_size).sum(1)
        return cls(order, counts, per_rank.tolist())


def all_to_all_v(x: torch.Tensor, send_sizes: list[int], recv_sizes: list[int], group: GroupCoordinator) -> torch.Tensor:
    """``torch.distributed.all_to_all_single`` with split sizes along dim 0 (empty pieces allowed)."""
    out = x.new_empty((sum(recv_sizes),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                           group=group.device_group)
    return out


def exchange_counts(expert_counts: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
    """Rank ``r`` sends every rank ``j`` its counts for ``j``'s experts; returns ``[ep, E/ep]``:
    ``out[src, e]`` = rows ``src`` will send to my local expert ``e``."""
    local = expert_counts.numel() // group.world_size
    out = torch.empty_like(expert_counts)
    dist.all_to_all_single(out, expert_counts.contiguous(), group=group.device_group)
    return out.view(group.world_size, local)


def dispatch_combine(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                     experts: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], group: GroupCoordinator,
                     layer_id: int = 0, records: list[DispatchRecord] | None = None) -> torch.Tensor:
    """The routed experts' output for my tokens ``x [t, h]`` under expert parallelism over ``group``.

    ``experts(rows, local_expert_ids) -> y`` runs this rank's experts on the rows it received.
    Appends a :class:`DispatchRecord` to ``records`` if given.
    """
    t, k = topk_ids.shape
    ep = group.world_size
    plan = DispatchPlan.build(topk_ids, num_experts, ep)
    token_of_row = plan.order // k
    recv_matrix = exchange_counts(plan.expert_counts.to(x.device), group).cpu()
    recv_sizes = recv_matrix.sum(1).tolist()
    received = all_to_all_v(x[token_of_row.to(x.device)], plan.send_sizes, recv_sizes, group)
    local_ids = torch.arange(num_experts // ep).repeat(ep).repeat_interleave(recv_matrix.reshape(-1))
    y = experts(received, local_ids.to(x.device))
    back = all_to_all_v(y, recv_sizes, plan.send_sizes, group)
    out = torch.zeros_like(x)
    weights = topk_weights.reshape(-1)[plan.order.to(x.device)].unsqueeze(1).to(back.dtype)
    out.index_add_(0, token_of_row.to(x.device), back * weights)
    if records is not None:
        records.append(DispatchRecord(layer_id, t, plan.expert_counts.tolist(), plan.send_sizes, recv_sizes,
                                      x.shape[1], x.element_size(), group.rank_in_group))
    return out


def expert_capacity(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows one expert may take from one rank per step: ``ceil(capacity_factor * tokens * top_k / E)``."""
    return math.ceil(capacity_factor * tokens * top_k / num_experts)


def capacity_send_sizes(expert_counts: Sequence[int], ep_size: int, capacity: int) -> tuple[list[int], list[int], int]:
    """One rank's dispatch if every expert took at most ``capacity`` of its rows (GShard / Switch style;
    hybridpar's model never drops, so it stays exact). Returns the variable send sizes after dropping,
    the sizes of a fixed-size all-to-all that pads every expert's piece to ``capacity`` (no count
    exchange needed), and the rows dropped."""
    counts = torch.as_tensor(list(expert_counts))
    kept = counts.clamp(max=capacity)
    per_rank = counts.numel() // ep_size
    return kept.view(ep_size, per_rank).sum(1).tolist(), [capacity * per_rank] * ep_size, int((counts - kept).sum())
