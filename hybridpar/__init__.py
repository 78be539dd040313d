"""hybridpar: tensor parallelism, RadixAttention under TP, and hybrid tensor + token parallelism.

The package mirrors the book:

=================================  ==========================================
chapter                            module
=================================  ==========================================
1 Why distribute inference         :mod:`hybridpar.roofline`
2 Collectives                      :mod:`hybridpar.distributed`
3 Tensor-parallel layers           :mod:`hybridpar.layers`
4 A tensor-parallel transformer    :mod:`hybridpar.models`
5 RadixAttention under TP          :mod:`hybridpar.radix`
6 Token parallelism                :mod:`hybridpar.tknp`
7 Performance                      ``bench/``
8 One engine: the LLM API          :mod:`hybridpar.engine`, :mod:`hybridpar.cli`
=================================  ==========================================

Public names are resolved lazily (PEP 562) so that ``import hybridpar`` stays cheap and
never imports transformers, matplotlib or ipywidgets.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # the engine (vLLM's offline API)
    "LLM": "hybridpar.engine",
    "SamplingParams": "hybridpar.core",
    "RequestOutput": "hybridpar.engine",
    "EngineConfig": "hybridpar.engine",
    "RankPool": "hybridpar.distributed.rank_pool",
    # launcher
    "launch": "hybridpar.distributed.launcher",
    "run_torchrun": "hybridpar.distributed.launcher",
    "is_torchrun": "hybridpar.distributed.launcher",
    "resolve_backend": "hybridpar.distributed.launcher",
    "current_device": "hybridpar.distributed.launcher",
    "RankFailedError": "hybridpar.distributed.launcher",
    "LaunchTimeoutError": "hybridpar.distributed.launcher",
    # process groups
    "initialize_model_parallel": "hybridpar.distributed.parallel_state",
    "initialize_tensor_parallel": "hybridpar.distributed.parallel_state",
    "destroy_model_parallel": "hybridpar.distributed.parallel_state",
    "compute_layout": "hybridpar.distributed.parallel_state",
    "get_tp_group": "hybridpar.distributed.parallel_state",
    "get_tknp_group": "hybridpar.distributed.parallel_state",
    "get_layout": "hybridpar.distributed.parallel_state",
    "get_tensor_model_parallel_rank": "hybridpar.distributed.parallel_state",
    "get_tensor_model_parallel_world_size": "hybridpar.distributed.parallel_state",
    "is_tknp_root": "hybridpar.distributed.parallel_state",
    "RankLayout": "hybridpar.distributed.parallel_state",
    "GroupCoordinator": "hybridpar.distributed.parallel_state",
    "ParallelConfig": "hybridpar.config",
    "ColumnParallelLinear": "hybridpar.layers",
    "RowParallelLinear": "hybridpar.layers",
    "MergedColumnParallelLinear": "hybridpar.layers",
    "QKVParallelLinear": "hybridpar.layers",
    "VocabParallelEmbedding": "hybridpar.layers",
    "ParallelLMHead": "hybridpar.layers",
    "valid_tp_sizes": "hybridpar.layers",
    "validate_tp_size": "hybridpar.layers",
    "ParallelConfigError": "hybridpar.config",
    "get_tknp_rank": "hybridpar.distributed.parallel_state",
    "get_tknp_world_size": "hybridpar.distributed.parallel_state",
    "is_tknp_initialized": "hybridpar.distributed.parallel_state",
    # token parallelism
    "TokenParallelAttention": "hybridpar.tknp",
    "AttentionWorker": "hybridpar.tknp",
    "TknpScheduler": "hybridpar.tknp",
    "compare_strategies": "hybridpar.tknp.memory",
    # RadixAttention serving
    "RadixCache": "hybridpar.radix",
    "Req": "hybridpar.radix",
    "ReqToTokenPool": "hybridpar.radix",
    "TokenToKVPoolAllocator": "hybridpar.radix",
    "MHATokenToKVPool": "hybridpar.radix",
    "check_integrity": "hybridpar.radix",
    "TPScheduler": "hybridpar.radix.scheduler",
    "ServerArgs": "hybridpar.config",
    "SharedPrefixWorkload": "hybridpar.radix.workload",
    "TPRadixAttentionModelWrapper": "hybridpar.models.model_wrapper",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hybridpar' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
