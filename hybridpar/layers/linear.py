"""Tensor-parallel linear layers (vLLM names and semantics).

A tensor-parallel (TP) group of ``tp`` ranks shares one linear layer ``y = x W^T + b``
(``W`` has shape ``[output_size, input_size]``) in one of two ways:

* **Column parallel**: rank ``r`` holds rows ``[r*n, (r+1)*n)`` of ``W`` (``n = output_size/tp``),
  i.e. a slice of the *output* features. Every rank needs the full input; the outputs are
  disjoint slices of ``y`` (gather them, or feed them to a row-parallel layer).
* **Row parallel**: rank ``r`` holds columns ``[r*k, (r+1)*k)`` of ``W`` (``k = input_size/tp``),
  i.e. a slice of the *input* features. Each rank computes a partial sum of ``y``; an all-reduce
  adds the partials up.

Column then Row (the MLP, or QKV then the output projection) needs exactly one all-reduce
per block in the forward pass: that is the Megatron-LM pattern. The ``f``/``g`` conjugate
operators of :mod:`hybridpar.distributed.mappings` carry the communication, so autograd
works through these layers.

Loading weights. Every parameter has ``param.weight_loader(param, loaded_weight[, shard_id])``.
``loaded_weight`` is the FULL checkpoint tensor, or a safetensors slice object
(``safe_open(...).get_slice(name)``); only this rank's shard is read from it, so a slice
never materialises the full tensor.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.distributed.communication_op import all_reduce_
from hybridpar.distributed.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from hybridpar.distributed.parallel_state import GroupCoordinator, ParallelConfigError, get_tp_group
from hybridpar.layers.head_partition import (  # noqa: F401  (importable from here, as before)
    QKVPartition,
    qkv_partition,
    valid_tp_sizes,
    validate_tp_size,
)

# A full checkpoint tensor, or a safetensors slice (has ``get_shape()`` and ``[...]`` indexing).
LoadedWeight = Any


# --------------------------------------------------------------------------- loading helpers
def _shape(loaded: LoadedWeight) -> tuple[int, ...]:
    """Shape of a checkpoint tensor or of a safetensors slice, without reading its data."""
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def _narrow(loaded: LoadedWeight, dim: int, start: int, size: int) -> torch.Tensor:
    """``loaded.narrow(dim, start, size)`` for a tensor or a safetensors slice.

    For a slice only the requested range is read from the file.
    """
    if isinstance(loaded, torch.Tensor):
        return loaded.narrow(dim, start, size)
    index = (slice(None),) * dim + (slice(start, start + size),)
    return loaded[index]


def _full(loaded: LoadedWeight) -> torch.Tensor:
    """The whole tensor (for replicated parameters such as a row-parallel bias)."""
    return loaded if isinstance(loaded, torch.Tensor) else loaded[:]


def _check_shape(loaded: LoadedWeight, expected: Sequence[int], what: str) -> None:
    got = _shape(loaded)
    if got != tuple(expected):
        raise ValueError(
            f"{what}: checkpoint tensor has shape {list(got)}, expected {list(expected)}; "
            "check that the layer sizes match the checkpoint's config.json"
        )


def _load_rows(param: nn.Parameter, loaded: LoadedWeight, dst_start: int, src_start: int, size: int) -> None:
    """Copy ``size`` rows (dim 0) of ``loaded`` starting at ``src_start`` into ``param[dst_start:]``."""
    param.data.narrow(0, dst_start, size).copy_(_narrow(loaded, 0, src_start, size))


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    """``numerator // denominator``, raising a clear error if it does not divide evenly."""
    if numerator % denominator != 0:
        raise ParallelConfigError(
            f"{what}={numerator} is not divisible by tensor_parallel_size={denominator}; "
            f"choose a tensor_parallel_size that divides {numerator}"
        )
    return numerator // denominator


# --------------------------------------------------------------------------- base class
class LinearBase(nn.Module):
    """Holds the TP group, its size and this rank's index. Parameters live on the default device."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype | None = None,
        tp_group: GroupCoordinator | None = None,
    ) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.params_dtype = params_dtype or torch.get_default_dtype()
        self.tp_group = tp_group if tp_group is not None else get_tp_group()
        self.tp_size = self.tp_group.world_size
        self.tp_rank = self.tp_group.rank_in_group

    def _new_param(self, *shape: int) -> nn.Parameter:
        param = nn.Parameter(torch.zeros(*shape, dtype=self.params_dtype), requires_grad=True)
        param.weight_loader = self.weight_loader  # defined by each subclass
        return param

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size}, tp_size={self.tp_size}, tp_rank={self.tp_rank}"


# --------------------------------------------------------------------------- column parallel
class ColumnParallelLinear(LinearBase):
    """``y = x W^T + b`` with ``W`` split along its output dimension (dim 0).

    Invariants: ``weight`` is ``[output_size/tp, input_size]``, ``bias`` is ``[output_size/tp]``;
    rank ``r`` holds output features ``[r*n, (r+1)*n)``. ``forward`` takes the full input and
    returns this rank's output slice, or, with ``gather_output=True``, the full output.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        tp_group: GroupCoordinator | None = None,
    ) -> None:
        super().__init__(input_size, output_size, params_dtype, tp_group)
        self.gather_output = gather_output
        self.output_size_per_partition = divide(output_size, self.tp_size, "output_size")
        self.weight = self._new_param(self.output_size_per_partition, input_size)
        self.bias = self._new_param(self.output_size_per_partition) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        """Copy rows ``[tp_rank*n, (tp_rank+1)*n)`` of the full weight (or bias) into ``param``."""
        _check_shape(loaded_weight, (self.output_size, *param.shape[1:]), type(self).__name__)
        n = self.output_size_per_partition
        _load_rows(param, loaded_weight, 0, self.tp_rank * n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        out = F.linear(x, self.weight, self.bias)
        return self._gather(out) if self.gather_output else out

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        return gather_from_tensor_model_parallel_region(local, group=self.tp_group)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers with the same input fused in one matmul (e.g. gate and up).

    Checkpoints store the parts separately (``gate_proj``, ``up_proj``); the weight loader takes
    ``loaded_shard_id`` = the index of the part in ``output_sizes``. Invariant: on every rank the
    local output is ``[part_0 slice | part_1 slice | ...]``, each part split across ranks on its own,
    so ``local.split(output_sizes_per_partition, -1)`` recovers this rank's slice of each part.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = True,
        gather_output: bool = False,
        params_dtype: torch.dtype | None = None,
        tp_group: GroupCoordinator | None = None,
    ) -> None:
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(self.output_sizes), bias, gather_output, params_dtype, tp_group)
        self.output_sizes_per_partition = [
            divide(size, self.tp_size, f"output_sizes[{i}]") for i, size in enumerate(self.output_sizes)
        ]

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: LoadedWeight, loaded_shard_id: int | None = None
    ) -> None:
        """Load part ``loaded_shard_id`` (its full checkpoint tensor), or, with ``None``, the already
        fused checkpoint tensor of all parts concatenated along dim 0."""
        if loaded_shard_id is None:
            _check_shape(loaded_weight, (self.output_size, *param.shape[1:]), type(self).__name__)
            parts = range(len(self.output_sizes))
        else:
            _check_shape(
                loaded_weight, (self.output_sizes[loaded_shard_id], *param.shape[1:]),
                f"{type(self).__name__} part {loaded_shard_id}",
            )
            parts = [loaded_shard_id]
        for i in parts:
            n = self.output_sizes_per_partition[i]
            dst = sum(self.output_sizes_per_partition[:i])
            src = self.tp_rank * n + (sum(self.output_sizes[:i]) if loaded_shard_id is None else 0)
            _load_rows(param, loaded_weight, dst, src, n)

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        # A plain gather gives [rank0: p0|p1, rank1: p0|p1, ...]; regroup it to [p0 | p1].
        gathered = super()._gather(local)
        per_rank = gathered.unflatten(-1, (self.tp_size, self.output_size_per_partition))
        parts = per_rank.split(self.output_sizes_per_partition, dim=-1)
        return torch.cat([p.flatten(-2) for p in parts], dim=-1)


# --------------------------------------------------------------------------- QKV with GQA
class QKVParallelLinear(ColumnParallelLinear):
    """The fused Q, K, V projections of (grouped-query) attention, split by heads.

    Which heads this rank holds is :func:`qkv_partition` (kept in ``self.partition``): ``num_heads =
    total_num_heads/tp`` query heads; ``num_kv_heads = total_num_kv_heads/tp`` KV heads, or, when
    ``tp > total_num_kv_heads``, one KV head replicated on ``num_kv_head_replicas`` ranks. The local output is ``[q | k | v]`` with widths
    ``q_size, kv_size, kv_size``: ``out.split([layer.q_size, layer.kv_size, layer.kv_size], -1)``.
    """

    def __init__(
        self,
        hidden_size: int,
        head_size: int,
        total_num_heads: int,
        total_num_kv_heads: int | None = None,
        bias: bool = True,
        params_dtype: torch.dtype | None = None,
        tp_group: GroupCoordinator | None = None,
    ) -> None:
        group = tp_group if tp_group is not None else get_tp_group()
        tp = group.world_size
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.partition = qkv_partition(total_num_heads, total_num_kv_heads, tp, group.rank_in_group)
        self.num_heads = self.partition.num_heads
        self.num_kv_heads = self.partition.num_kv_heads
        self.num_kv_head_replicas = self.partition.num_kv_head_replicas
        self.q_size = self.num_heads * head_size
        self.kv_size = self.num_kv_heads * head_size
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp * head_size
        super().__init__(hidden_size, output_size, bias, False, params_dtype, group)

    @property
    def kv_head_start(self) -> int:
        """Index of this rank's first KV head in the checkpoint."""
        return self.partition.kv_head_start

    def weight_loader(
        self, param: nn.Parameter, loaded_weight: LoadedWeight, loaded_shard_id: str | None = None
    ) -> None:
        """Load ``q_proj``/``k_proj``/``v_proj`` (``loaded_shard_id`` "q", "k", "v"), or, with ``None``,
        a fused checkpoint tensor ``[q; k; v]`` of ``(total_num_heads + 2*total_num_kv_heads)*head_size`` rows."""
        hs = self.head_size
        total_q, total_kv = self.total_num_heads * hs, self.total_num_kv_heads * hs
        # shard id -> (rows in the checkpoint tensor, offset in it when fused, offset in param, size, this rank's start)
        layout = {
            "q": (total_q, 0, 0, self.q_size, self.partition.q_head_start * hs),
            "k": (total_kv, total_q, self.q_size, self.kv_size, self.kv_head_start * hs),
            "v": (total_kv, total_q + total_kv, self.q_size + self.kv_size, self.kv_size, self.kv_head_start * hs),
        }
        if loaded_shard_id is None:
            _check_shape(loaded_weight, (total_q + 2 * total_kv, *param.shape[1:]), "QKVParallelLinear (fused)")
            for _, fused_offset, dst, size, start in layout.values():
                _load_rows(param, loaded_weight, dst, fused_offset + start, size)
            return
        if loaded_shard_id not in layout:
            raise ValueError(f"QKVParallelLinear: loaded_shard_id must be 'q', 'k' or 'v', got {loaded_shard_id!r}")
        rows, _, dst, size, start = layout[loaded_shard_id]
        _check_shape(loaded_weight, (rows, *param.shape[1:]), f"QKVParallelLinear {loaded_shard_id}_proj")
        _load_rows(param, loaded_weight, dst, start, size)


# --------------------------------------------------------------------------- row parallel
class RowParallelLinear(LinearBase):
    """``y = x W^T + b`` with ``W`` split along its input dimension (dim 1).

    Invariants: ``weight`` is ``[output_size, input_size/tp]``; ``bias`` is ``[output_size]``,
    replicated. The bias is added exactly once:

    * ``reduce_results=True``: the partial products are all-reduced, then every rank adds the
      bias, so every rank returns the full ``y``.
    * ``reduce_results=False``: rank 0 adds the bias to its partial product and no rank
      communicates; the caller must sum the outputs over the TP group (e.g. one all-reduce
      fused with something else). The sum over ranks is always ``y``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        input_is_parallel: bool = True,
        reduce_results: bool = True,
        params_dtype: torch.dtype | None = None,
        tp_group: GroupCoordinator | None = None,
    ) -> None:
        super().__init__(input_size, output_size, params_dtype, tp_group)
        self.input_is_parallel = input_is_parallel
        self.reduce_results = reduce_results
        self.input_size_per_partition = divide(input_size, self.tp_size, "input_size")
        self.weight = self._new_param(output_size, self.input_size_per_partition)
        self.bias = self._new_param(output_size) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        """Weight: copy columns ``[tp_rank*k, (tp_rank+1)*k)``. Bias: copy it whole."""
        if param is self.bias:
            _check_shape(loaded_weight, (self.output_size,), "RowParallelLinear bias")
            param.data.copy_(_full(loaded_weight))
            return
        _check_shape(loaded_weight, (self.output_size, self.input_size), "RowParallelLinear weight")
        k = self.input_size_per_partition
        param.data.copy_(_narrow(loaded_weight, 1, self.tp_rank * k, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, group=self.tp_group)
        if self.reduce_results:
            partial = F.linear(x, self.weight)
            if torch.is_grad_enabled():  # the autograd-aware g operator (backward: identity)
                out = reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)
            else:  # inference: the partial sum is a fresh temporary, reduce it in place (no copy)
                out = all_reduce_(partial, self.tp_group)
            return out + self.bias if self.bias is not None else out
        bias = self.bias if self.tp_rank == 0 else None
        return F.linear(x, self.weight, bias)
