"""Vocabulary-parallel token embedding and LM head (vLLM names and semantics).

The vocabulary (often 100k+ rows) is split by rows over the tensor-parallel group:

* :class:`VocabParallelEmbedding`: each rank looks up the token ids that fall in its row
  range, writes zeros for the others, and an all-reduce sums the partial embeddings.
* :class:`ParallelLMHead`: each rank multiplies the hidden states by its rows of the
  (usually tied) embedding matrix, giving logits for its slice of the vocabulary; an
  all-gather concatenates the slices.

Padding. The vocabulary is padded up to a multiple of ``padding_size * tp`` so that every
rank holds the same number of rows and that number is a multiple of ``padding_size``
(aligned, kernel-friendly shapes). Padding rows are never loaded from the checkpoint and
stay zero; logits are trimmed back to ``org_vocab_size``. The padded size therefore
depends on ``tp``; it never leaks out of these layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.distributed.mappings import (
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)
from hybridpar.distributed.parallel_state import GroupCoordinator, get_tp_group
from hybridpar.layers.linear import LoadedWeight, _check_shape, _load_rows


@dataclass(frozen=True)
class VocabShard:
    """Which vocabulary rows one rank holds.

    Invariants: ``0 <= start < end <= num_embeddings_padded``; ``end - start`` is the same on
    every rank; rows ``[start, org_end)`` come from the checkpoint, rows ``[org_end, end)`` are padding.
    """

    org_vocab_size: int
    num_embeddings_padded: int
    start: int
    end: int

    @property
    def num_rows(self) -> int:
        return self.end - self.start

    @property
    def org_end(self) -> int:
        """End of the checkpoint rows in this shard (``start`` if the shard is all padding)."""
        return max(self.start, min(self.end, self.org_vocab_size))

    @property
    def num_org_rows(self) -> int:
        return self.org_end - self.start


def pad_vocab_size(vocab_size: int, padding_size: int, tp_size: int) -> int:
    """Round ``vocab_size`` up to a multiple of ``padding_size * tp_size``."""
    multiple = padding_size * tp_size
    return -(-vocab_size // multiple) * multiple


def vocab_shard(org_vocab_size: int, tp_rank: int, tp_size: int, padding_size: int = 64) -> VocabShard:
    """The rows of the padded vocabulary held by ``tp_rank`` (pure; no process group needed)."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})")
    padded = pad_vocab_size(org_vocab_size, padding_size, tp_size)
    per_rank = padded // tp_size
    return VocabShard(org_vocab_size, padded, tp_rank * per_rank, (tp_rank + 1) * per_rank)


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the vocabulary split by rows over the TP group.

    ``weight`` is ``[shard.num_rows, embedding_dim]``. ``forward(ids)`` returns the full embedding
    ``[*ids.shape, embedding_dim]`` on every rank. Ids must lie in ``[0, org_vocab_size)``; ids in
    the padding range ``[org_vocab_size, num_embeddings_padded)`` give zero vectors.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        params_dtype: torch.dtype | None = None,
        padding_size: int = 64,
        tp_group: GroupCoordinator | None = None,
    ) -> None:
        super().__init__()
        self.tp_group = tp_group if tp_group is not None else get_tp_group()
        self.tp_size = self.tp_group.world_size
        self.tp_rank = self.tp_group.rank_in_group
        self.org_vocab_size = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_size = padding_size
        self.shard = vocab_shard(num_embeddings, self.tp_rank, self.tp_size, padding_size)
        self.num_embeddings_padded = self.shard.num_embeddings_padded
        self.num_embeddings_per_partition = self.shard.num_rows
        dtype = params_dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.zeros(self.shard.num_rows, embedding_dim, dtype=dtype))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
        """Copy checkpoint rows ``[shard.start, shard.org_end)`` (``[org_vocab_size, ...]`` tensor or
        slice) into ``param``; padding rows are set to zero. Loading twice is harmless (idempotent)."""
        _check_shape(loaded_weight, (self.org_vocab_size, *param.shape[1:]), type(self).__name__)
        n = self.shard.num_org_rows
        if n > 0:
            _load_rows(param, loaded_weight, 0, self.shard.start, n)
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.shard.start) | (input_ids >= self.shard.end)
        local_ids = (input_ids - self.shard.start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)

    def extra_repr(self) -> str:
        return (
            f"vocab={self.org_vocab_size} (padded {self.num_embeddings_padded}), dim={self.embedding_dim}, "
            f"rows=[{self.shard.start}, {self.shard.end}), tp_size={self.tp_size}"
        )


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to vocabulary logits, split by vocabulary rows like the embedding.

    ``forward(hidden_states)`` returns the full logits ``[..., org_vocab_size]`` on every rank:
    local matmul with this rank's rows, all-gather over the vocabulary, padding trimmed.
    For tied embeddings call :meth:`tie_weights` (the head then shares the embedding's Parameter,
    whose ``weight_loader`` fills both at once).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bias: bool = False,
        params_dtype: torch.dtype | None = None,
        padding_size: int = 64,
        tp_group: GroupCoordinator | None = None,
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, params_dtype, padding_size, tp_group)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.shard.num_rows, dtype=self.weight.dtype))
            self.bias.weight_loader = self.weight_loader

    def tie_weights(self, embedding: VocabParallelEmbedding) -> "ParallelLMHead":
        """Share ``embedding.weight`` (same Parameter object). The shards must be laid out identically."""
        mine = (self.shard, self.embedding_dim, self.tp_group.ranks)
        theirs = (embedding.shard, embedding.embedding_dim, embedding.tp_group.ranks)
        if mine != theirs:
            raise ValueError(
                f"cannot tie ParallelLMHead to the embedding: shard/dim/group differ ({mine} vs {theirs}); "
                "build both with the same num_embeddings, embedding_dim, padding_size and tp_group"
            )
        self.weight = embedding.weight
        return self

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        local_logits = F.linear(hidden_states, self.weight, self.bias)
        logits = gather_from_tensor_model_parallel_region(local_logits, group=self.tp_group)
        return logits[..., : self.org_vocab_size]
