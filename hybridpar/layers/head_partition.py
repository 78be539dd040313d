"""Which attention heads each tensor-parallel rank holds (grouped-query attention; pure arithmetic).

Query heads are split evenly over the TP ranks. KV heads are split evenly too while there are at
least as many as ranks; beyond that each KV head is *replicated* on ``tp / num_kv_heads``
consecutive ranks. :func:`valid_tp_sizes` lists the TP sizes a head layout allows,
:func:`validate_tp_size` rejects the others with a message that lists the valid ones (before any
process starts), and :func:`qkv_partition` says which heads one rank holds. No process group is
needed: the QKV layer (:class:`~hybridpar.layers.linear.QKVParallelLinear`), the model config
check, TKNP's geometry and the book's viewers all call these functions.
"""
from __future__ import annotations

from dataclasses import dataclass

from hybridpar.config import ParallelConfigError


def valid_tp_sizes(total_num_heads: int, total_num_kv_heads: int | None = None) -> list[int]:
    """Tensor-parallel sizes (up to ``total_num_heads``) that can shard this attention layout.

    A size ``tp`` works when it divides the query heads and is either a divisor of the KV heads
    (each rank holds ``kv/tp`` of them) or a multiple of them (each KV head is replicated on
    ``tp/kv`` ranks).
    """
    kv = total_num_kv_heads or total_num_heads
    return [
        tp for tp in range(1, total_num_heads + 1)
        if total_num_heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)
    ]


def validate_tp_size(total_num_heads: int, total_num_kv_heads: int | None, tp_size: int) -> None:
    """Raise :class:`ParallelConfigError` (a ``ValueError``) if ``tp_size`` cannot shard the heads.

    Pure: call it before spawning any process. The message lists the sizes that would work.
    """
    kv = total_num_kv_heads or total_num_heads
    if tp_size in valid_tp_sizes(total_num_heads, kv):
        return
    if total_num_heads % tp_size != 0:
        reason = f"{total_num_heads} query heads cannot be split evenly over {tp_size} ranks"
    else:
        reason = f"{tp_size} is neither a divisor nor a multiple of the {kv} KV heads"
    valid = ", ".join(str(t) for t in valid_tp_sizes(total_num_heads, kv))
    raise ParallelConfigError(
        f"tensor_parallel_size={tp_size} does not fit this model: {reason}. "
        f"num_heads={total_num_heads}, num_kv_heads={kv}: valid tensor_parallel_size values are {valid}"
    )


@dataclass(frozen=True)
class QKVPartition:
    """The attention heads one TP rank holds (pure data; see :func:`qkv_partition`).

    Invariants: the rank holds query heads ``[q_head_start, q_head_start + num_heads)`` and KV heads
    ``[kv_head_start, kv_head_start + num_kv_heads)``; each KV head is held by ``num_kv_head_replicas``
    consecutive ranks (1 unless ``tp > total_num_kv_heads``).
    """

    num_heads: int
    num_kv_heads: int
    num_kv_head_replicas: int
    q_head_start: int
    kv_head_start: int


def qkv_partition(total_num_heads: int, total_num_kv_heads: int | None, tp_size: int, tp_rank: int) -> QKVPartition:
    """Which query and KV heads ``tp_rank`` of ``tp_size`` holds (pure; no process group needed).

    Query heads are split evenly. KV heads are split evenly when ``tp_size <= total_num_kv_heads``;
    otherwise every rank holds one KV head and ``tp_size / total_num_kv_heads`` consecutive ranks
    share (replicate) it, so rank ``r`` holds KV head ``r // replicas``.
    """
    kv = total_num_kv_heads or total_num_heads
    validate_tp_size(total_num_heads, kv, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, tp_size={tp_size})")
    num_heads = total_num_heads // tp_size
    num_kv_heads, replicas = (1, tp_size // kv) if tp_size >= kv else (kv // tp_size, 1)
    return QKVPartition(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        num_kv_head_replicas=replicas,
        q_head_start=tp_rank * num_heads,
        kv_head_start=(tp_rank // replicas) * num_kv_heads,
    )
