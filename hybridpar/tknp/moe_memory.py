"""Weights per rank of an MoE model under TP, TP x TKNP, with TP experts or expert parallelism (arithmetic).

Where an MoE model's bytes go, per rank of one TP x TKNP block (rank ``tknp * tp + t``, the EP
rank order of :func:`~hybridpar.distributed.parallel_state.expert_parallel_groups`):

===========================  ==============================  ===================================
layout                       a root (TKNP rank 0)            a non-root (TKNP rank > 0)
===========================  ==============================  ===================================
TP experts                   dense / tp + every expert / tp  nothing
EP (over TP, or TP x TKNP)   dense / tp + E / ep experts     E / ep experts, no dense weight
===========================  ==============================  ===================================

"dense" is everything but the routed experts: embeddings and LM head (vocabulary padded per rank),
attention, norms, the router (replicated), the shared expert and its gate. The numbers are exact:
``tests/test_moe.py`` checks them against the parameters the ranks allocate.
"""

from __future__ import annotations

import dataclasses

from hybridpar.models.config import ModelConfig
from hybridpar.models.moe_config import expert_parallel_size
from hybridpar.tknp.memory import decoder_param_bytes


def dense_bytes(config: ModelConfig, tp: int, bytes_per_param: int = 4) -> int:
    """Bytes of everything but the routed experts on one TP rank of a root."""
    moe = config.moe
    h = config.hidden_size
    no_mlp = decoder_param_bytes(dataclasses.replace(config, intermediate_size=0), tp, bytes_per_param)
    per_layer = []
    for layer in range(config.num_layers):
        if moe is None or not moe.is_sparse(layer):
            per_layer.append(3 * h * (config.intermediate_size // tp))
            continue
        shared = 3 * h * (moe.shared_expert_intermediate_size // tp) + h if moe.shared_expert_intermediate_size else 0
        per_layer.append(moe.num_experts * h + shared)
    return no_mlp + sum(per_layer) * bytes_per_param


def expert_bytes(config: ModelConfig, experts: int, intermediate: int, bytes_per_param: int = 4) -> int:
    """Bytes of ``experts`` experts of width ``intermediate`` in every sparse layer."""
    sparse = sum(config.moe.is_sparse(layer) for layer in range(config.num_layers))
    return sparse * experts * 3 * config.hidden_size * intermediate * bytes_per_param


def moe_weight_bytes(config: ModelConfig, tensor_parallel_size: int = 1, token_parallel_size: int = 1,
                     expert_parallel: bool = False, bytes_per_param: int = 4) -> list[dict[str, int]]:
    """``{"experts", "dense"}`` bytes of each rank of one TP x TKNP block, in global rank order."""
    tp, tknp, moe = tensor_parallel_size, token_parallel_size, config.moe
    dense = dense_bytes(config, tp, bytes_per_param)
    if expert_parallel:
        ep = expert_parallel_size(tp, tknp, tknp > 1)
        experts = expert_bytes(config, moe.num_experts // ep, moe.moe_intermediate_size, bytes_per_param)
        return [{"experts": experts, "dense": dense if rank < tp else 0} for rank in range(tp * tknp)]
    experts = expert_bytes(config, moe.num_experts, moe.moe_intermediate_size // tp, bytes_per_param)
    return [{"experts": experts, "dense": dense} if rank < tp else {"experts": 0, "dense": 0}
            for rank in range(tp * tknp)]
