"""Collectives on a :class:`~hybridpar.distributed.parallel_state.GroupCoordinator`.

Thin wrappers over ``torch.distributed`` that speak in *group* ranks (``src``,
``dst`` index ``group.ranks``), default to the tensor-parallel group, split or
concatenate along any dimension, and are the identity on a group of one rank.

Invariants every function keeps:

* inputs are never modified in place, except by :func:`broadcast` (which fills
  its argument on non-source ranks, like ``torch.distributed.broadcast``);
* each call is collective: every rank of the group must make it, in the same order;
* reduce-scatter is ``reduce_scatter_tensor`` on every backend (gloo runs it too);
  all-gather is the fused ``all_gather_into_tensor`` on NCCL and the list
  ``all_gather`` on gloo.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from hybridpar.distributed.parallel_state import GroupCoordinator, get_tp_group

__all__ = [
    "all_reduce",
    "all_reduce_",
    "all_gather",
    "reduce_scatter",
    "gather",
    "scatter",
    "broadcast",
    "broadcast_object",
    "scatterv",
    "gatherv",
    "local_shard",
    "tensor_model_parallel_all_reduce",
    "tensor_model_parallel_all_gather",
]



def _uses_fused_collectives(group: GroupCoordinator) -> bool:
    return dist.get_backend(group.device_group) == "nccl"


def _check_group_rank(name: str, value: int, group: GroupCoordinator) -> None:
    if not 0 <= value < group.world_size:
        raise ValueError(
            f"{name}={value} is not a rank of this group (size {group.world_size}); "
            f"{name} is a rank *within the group*, 0..{group.world_size - 1}."
        )


def _check_divisible(x: torch.Tensor, dim: int, group: GroupCoordinator, op: str) -> None:
    if x.shape[dim] % group.world_size:
        raise ValueError(
            f"{op}: size {x.shape[dim]} of dim {dim} is not divisible by the group size "
            f"{group.world_size}; pad the tensor or use scatterv/gatherv for uneven splits."
        )


def _stack_to_dim(parts: torch.Tensor, dim: int) -> torch.Tensor:
    """``parts`` has shape (world, *shape); concatenate the parts along ``dim`` of ``shape``."""
    world, *shape = parts.shape
    dim = dim % len(shape)
    shape[dim] *= world
    return parts.movedim(0, dim).reshape(shape)


def local_shard(x: torch.Tensor, dim: int = -1, group: GroupCoordinator | None = None) -> torch.Tensor:
    """This rank's equal chunk of ``x`` along ``dim`` (no communication; contiguous copy)."""
    group = group or get_tp_group()
    if group.world_size == 1:
        return x
    _check_divisible(x, dim, group, "local_shard")
    return x.chunk(group.world_size, dim=dim)[group.rank_in_group].contiguous()


def all_reduce(x: torch.Tensor, group: GroupCoordinator | None = None) -> torch.Tensor:
    """Sum of ``x`` over the group, as a new tensor on every rank (``x`` itself on one rank)."""
    group = group or get_tp_group()
    if group.world_size == 1:
        return x
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group.device_group)
    return out


def all_reduce_(x: torch.Tensor, group: GroupCoordinator | None = None) -> torch.Tensor:
    """In-place :func:`all_reduce`: ``x`` is overwritten with the sum and returned.

    For inference hot paths whose input is a temporary nobody else reads (a row-parallel
    matmul's partial output): it saves :func:`all_reduce`'s copy, one extra read and write of the
    message, which costs several percent of bus bandwidth at large sizes and a kernel launch at
    small ones. A non-contiguous ``x`` falls back to :func:`all_reduce`.
    """
    group = group or get_tp_group()
    if group.world_size == 1:
        return x
    if not x.is_contiguous():
        return all_reduce(x, group)
    dist.all_reduce(x, group=group.device_group)
    return x


def all_gather(x: torch.Tensor, dim: int = -1, group: GroupCoordinator | None = None) -> torch.Tensor:
    """Concatenation of every rank's ``x`` along ``dim``, in group-rank order, on every rank."""
    group = group or get_tp_group()
    if group.world_size == 1:
        return x
    x = x.contiguous()
    parts = torch.empty((group.world_size, *x.shape), dtype=x.dtype, device=x.device)
    if _uses_fused_collectives(group):
        dist.all_gather_into_tensor(parts, x, group=group.device_group)
    else:
        dist.all_gather(list(parts.unbind(0)), x, group=group.device_group)
    return _stack_to_dim(parts, dim)


def reduce_scatter(x: torch.Tensor, dim: int = -1, group: GroupCoordinator | None = None) -> torch.Tensor:
    """Sum ``x`` over the group, then keep this rank's equal chunk along ``dim``."""
    group = group or get_tp_group()
    if group.world_size == 1:
        return x
    _check_divisible(x, dim, group, "reduce_scatter")
    moved = x.movedim(dim, 0).contiguous()
    out = torch.empty(
        (moved.shape[0] // group.world_size, *moved.shape[1:]), dtype=x.dtype, device=x.device
    )
    dist.reduce_scatter_tensor(out, moved, group=group.device_group)
    return out.movedim(0, dim).contiguous()


def gather(
    x: torch.Tensor, dst: int = 0, dim: int = -1, group: GroupCoordinator | None = None
) -> torch.Tensor | None:
    """Concatenation of every rank's ``x`` along ``dim`` on group rank ``dst``; ``None`` elsewhere."""
    group = group or get_tp_group()
    _check_group_rank("dst", dst, group)
    if group.world_size == 1:
        return x
    x = x.contiguous()
    parts = None
    if group.rank_in_group == dst:
        parts = torch.empty((group.world_size, *x.shape), dtype=x.dtype, device=x.device)
    dist.gather(
        x,
        list(parts.unbind(0)) if parts is not None else None,
        dst=group.ranks[dst],
        group=group.device_group,
    )
    return None if parts is None else _stack_to_dim(parts, dim)


def scatter(x: torch.Tensor, src: int = 0, dim: int = 0, group: GroupCoordinator | None = None) -> torch.Tensor:
    """Split ``x`` from group rank ``src`` into equal chunks along ``dim``; rank i gets chunk i.

    Like :func:`broadcast`, every rank passes a tensor of the full shape, dtype and
    device; only ``src``'s values are read.
    """
    group = group or get_tp_group()
    _check_group_rank("src", src, group)
    if group.world_size == 1:
        return x
    _check_divisible(x, dim, group, "scatter")
    chunk_shape = list(x.shape)
    chunk_shape[dim] //= group.world_size
    out = torch.empty(chunk_shape, dtype=x.dtype, device=x.device)
    chunks = None
    if group.rank_in_group == src:
        chunks = [c.contiguous() for c in x.chunk(group.world_size, dim=dim)]
    dist.scatter(out, chunks, src=group.ranks[src], group=group.device_group)
    return out


def broadcast(x: torch.Tensor, src: int = 0, group: GroupCoordinator | None = None) -> torch.Tensor:
    """Overwrite ``x`` on every rank with group rank ``src``'s ``x``; returns ``x``."""
    group = group or get_tp_group()
    _check_group_rank("src", src, group)
    if group.world_size == 1:
        return x
    buffer = x if x.is_contiguous() else x.contiguous()
    dist.broadcast(buffer, src=group.ranks[src], group=group.device_group)
    if buffer is not x:
        x.copy_(buffer)
    return x


def broadcast_object(obj: Any, src: int = 0, group: GroupCoordinator | None = None) -> Any:
    """Group rank ``src``'s picklable ``obj`` on every rank (sent over the gloo ``cpu_group``)."""
    group = group or get_tp_group()
    _check_group_rank("src", src, group)
    if group.world_size == 1:
        return obj
    box = [obj if group.rank_in_group == src else None]
    dist.broadcast_object_list(box, src=group.ranks[src], group=group.cpu_group)
    return box[0]


def _check_split_sizes(split_sizes: Sequence[int], group: GroupCoordinator) -> list[int]:
    sizes = [int(s) for s in split_sizes]
    if len(sizes) != group.world_size or any(s < 0 for s in sizes):
        raise ValueError(
            f"split_sizes={list(split_sizes)} must hold one non-negative size per rank "
            f"of the group ({group.world_size} ranks)."
        )
    return sizes


def _pad_to(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """``x`` zero-padded at the end of ``dim`` to ``length`` (contiguous)."""
    if x.shape[dim] == length:
        return x.contiguous()
    shape = list(x.shape)
    shape[dim] = length - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def scatterv(
    x: torch.Tensor,
    split_sizes: Sequence[int],
    src: int = 0,
    dim: int = 0,
    group: GroupCoordinator | None = None,
) -> torch.Tensor:
    """Split ``x`` on group rank ``src`` into pieces of ``split_sizes`` along ``dim``; rank i gets piece i.

    Sizes may differ and may be zero (token parallelism hands each rank a
    different number of tokens). On ranks other than ``src`` only the dtype,
    device and the sizes of the other dimensions of ``x`` are used, so an empty
    tensor such as ``x.new_empty(0, *rest)`` is enough. Every rank passes the
    same ``split_sizes``.
    """
    group = group or get_tp_group()
    _check_group_rank("src", src, group)
    sizes = _check_split_sizes(split_sizes, group)
    if group.world_size == 1:
        return x
    is_src = group.rank_in_group == src
    if is_src and x.shape[dim] != sum(sizes):
        raise ValueError(
            f"scatterv: x has size {x.shape[dim]} along dim {dim} but split_sizes sum to "
            f"{sum(sizes)}; the sizes must add up to the length being split."
        )
    longest = max(sizes)
    out_shape = list(x.shape)
    out_shape[dim] = longest
    padded = None
    if is_src:
        padded = [_pad_to(piece, dim, longest) for piece in x.split(sizes, dim=dim)]
    if longest > 0:
        out = torch.empty(out_shape, dtype=x.dtype, device=x.device)
        dist.scatter(out, padded, src=group.ranks[src], group=group.device_group)
    else:
        out = x.new_empty(out_shape)
    return out.narrow(dim, 0, sizes[group.rank_in_group]).contiguous()


def gatherv(
    x: torch.Tensor,
    split_sizes: Sequence[int],
    dst: int = 0,
    dim: int = 0,
    group: GroupCoordinator | None = None,
) -> torch.Tensor | None:
    """Inverse of :func:`scatterv`: concatenate pieces of ``split_sizes`` along ``dim`` on ``dst``.

    Rank i's ``x`` must have size ``split_sizes[i]`` along ``dim`` (zero allowed).
    Returns the concatenation on group rank ``dst`` and ``None`` elsewhere.
    """
    group = group or get_tp_group()
    _check_group_rank("dst", dst, group)
    sizes = _check_split_sizes(split_sizes, group)
    if group.world_size == 1:
        return x
    if x.shape[dim] != sizes[group.rank_in_group]:
        raise ValueError(
            f"gatherv: this rank (group rank {group.rank_in_group}) has size {x.shape[dim]} along "
            f"dim {dim} but split_sizes says {sizes[group.rank_in_group]}; pass the same "
            f"split_sizes used for scatterv."
        )
    longest = max(sizes)
    is_dst = group.rank_in_group == dst
    if longest == 0:
        return x if is_dst else None
    padded = _pad_to(x, dim, longest)
    parts = [torch.empty_like(padded) for _ in sizes] if is_dst else None
    dist.gather(padded, parts, dst=group.ranks[dst], group=group.device_group)
    if parts is None:
        return None
    return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim=dim)


def tensor_model_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """vLLM name for :func:`all_reduce` over the tensor-parallel group."""
    return all_reduce(x, get_tp_group())


def tensor_model_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """vLLM name for :func:`all_gather` over the tensor-parallel group."""
    return all_gather(x, dim, get_tp_group())
