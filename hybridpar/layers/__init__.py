"""Tensor-parallel layers: linear (column, row, merged, QKV) and vocabulary-parallel embedding / LM head."""

from hybridpar.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    valid_tp_sizes,
    validate_tp_size,
)
from hybridpar.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
    VocabShard,
    pad_vocab_size,
    vocab_shard,
)

__all__ = [
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "VocabShard",
    "pad_vocab_size",
    "valid_tp_sizes",
    "validate_tp_size",
    "vocab_shard",
]
