"""Megatron-style conjugate operators for tensor parallelism, as autograd functions.

A column-parallel linear layer needs its (replicated) input on every rank and
produces a sharded output; a row-parallel one consumes a sharded input and
produces partial sums. The four operators below mark those boundaries, and
come in conjugate pairs -- each one's backward is the other one's forward:

====================  ==========================  ============================
operator              forward                     backward
====================  ==========================  ============================
copy  (``f``)         identity                    all-reduce
reduce (``g``)        all-reduce                  identity
scatter               keep own chunk of last dim  all-gather last dim
gather                all-gather last dim         keep own chunk of last dim
====================  ==========================  ============================

``f`` and ``g`` bracket a column-parallel -> row-parallel pair (an MLP or an
attention block): ``y = g(f(x) @ A_i @ B_i)``. Every function takes an
optional ``group`` (a :class:`~hybridpar.distributed.parallel_state.GroupCoordinator`),
defaulting to the tensor-parallel group, so token parallelism can reuse them.
"""

from __future__ import annotations

import torch

from hybridpar.distributed.communication_op import all_gather, all_reduce, local_shard
from hybridpar.distributed.parallel_state import GroupCoordinator, get_tp_group

__all__ = [
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
]


class _CopyToModelParallelRegion(torch.autograd.Function):
    """``f``. Forward: identity. Backward: all-reduce the gradient over the group.

    Each rank uses the replicated input for its own shard of the computation, so
    the input's gradient is the sum of the ranks' contributions.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_reduce(grad, ctx.group), None


class _ReduceFromModelParallelRegion(torch.autograd.Function):
    """``g``. Forward: all-reduce the partial sums. Backward: identity.

    The output is replicated, so every rank already holds the full output gradient.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
        return all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _ScatterToModelParallelRegion(torch.autograd.Function):
    """Forward: keep this rank's chunk of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
        ctx.group = group
        return local_shard(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return all_gather(grad, -1, ctx.group), None


class _GatherFromModelParallelRegion(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep this rank's chunk of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: GroupCoordinator) -> torch.Tensor:
        ctx.group = group
        return all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return local_shard(grad, -1, ctx.group), None



def copy_to_tensor_model_parallel_region(x: torch.Tensor, group: GroupCoordinator | None = None) -> torch.Tensor:
    """``f``: identity forward, all-reduce backward."""
    return _CopyToModelParallelRegion.apply(x, group or get_tp_group())


def reduce_from_tensor_model_parallel_region(x: torch.Tensor, group: GroupCoordinator | None = None) -> torch.Tensor:
    """``g``: all-reduce forward, identity backward."""
    return _ReduceFromModelParallelRegion.apply(x, group or get_tp_group())


def scatter_to_tensor_model_parallel_region(x: torch.Tensor, group: GroupCoordinator | None = None) -> torch.Tensor:
    """Split the last dim forward, all-gather it backward."""
    return _ScatterToModelParallelRegion.apply(x, group or get_tp_group())


def gather_from_tensor_model_parallel_region(x: torch.Tensor, group: GroupCoordinator | None = None) -> torch.Tensor:
    """All-gather the last dim forward, split it backward."""
    return _GatherFromModelParallelRegion.apply(x, group or get_tp_group())
