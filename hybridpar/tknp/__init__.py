"""Chapter 6: token parallelism (TKNP).

The root rank of each token-parallel group runs the whole model (its TP share of it) for the
whole batch -- embeddings, norms, QKV and output projections, MLP, LM head -- but attention is
spread by request: every rank of the group attends for the requests whose KV cache it holds.
Non-root ranks hold no weights at all, only KV cache.

* :mod:`.placement` -- which rank holds a request's KV (balance KV tokens; stable placement).
* :mod:`.attention` -- :class:`TokenParallelAttention`, the root's attention backend: scatterv
  Q/K/V by request, attend locally, gatherv the outputs, restore the order.
* :mod:`.worker` -- :class:`AttentionWorker`, a non-root rank: KV cache + attention, no model.
* :mod:`.radix_scheduler` -- :class:`TknpScheduler`, the engine's scheduler under token
  parallelism: a paged pool and a radix tree per TKNP rank (TPScheduler's policy, per rank).
* :mod:`.memory` -- weights and KV capacity per rank for TP, DP and TKNP.
* :mod:`.runner` -- bringing up a root (its scheduler) or a worker from a :class:`~.runner.TknpSetup`.
* :mod:`.cli` -- ``python -m hybridpar.tknp.cli`` (the seed's flags) and ``run_demo``;
  ``torchrun -m hybridpar.demos.tknp_demo`` is the torchrun entry point.
* :mod:`.verify` -- ``python -m hybridpar.tknp.verify``: TKNP versus TP-only and transformers.

Serving requests with token parallelism is :class:`hybridpar.LLM`'s job
(``LLM(token_parallel_size=k)``): one engine for every layout, whose TKNP roots run a
:class:`TknpScheduler` and whose other ranks run an :class:`AttentionWorker`.

Mixture-of-experts models (Qwen2-MoE): with tensor-parallel experts the roots hold the experts like
any dense weight; with expert parallelism the EP group spans TP x TKNP, as the seed lays it out, and
every non-root rank becomes an :class:`~.expert_worker.ExpertWorker`: KV cache, attention and
``E / (tp * tknp)`` whole experts, still no attention or dense weight.
"""

from hybridpar.tknp.attention import (
    AttentionGeometry,
    KVCapacity,
    PassPlan,
    SubBatch,
    TknpForwardBatch,
    TokenParallelAttention,
    split_batch,
)
from hybridpar.tknp.memory import MemoryPlan, RankMemory, compare_strategies, format_memory_table, plan_memory
from hybridpar.tknp.placement import RequestPlacer, least_loaded, place_all
from hybridpar.tknp.radix_scheduler import TknpScheduler
from hybridpar.tknp.worker import AttentionWorker, WorkerStats

__all__ = [
    "AttentionGeometry",
    "AttentionWorker",
    "KVCapacity",
    "MemoryPlan",
    "PassPlan",
    "RankMemory",
    "RequestPlacer",
    "SubBatch",
    "TknpForwardBatch",
    "TknpScheduler",
    "TokenParallelAttention",
    "WorkerStats",
    "compare_strategies",
    "format_memory_table",
    "least_loaded",
    "place_all",
    "plan_memory",
    "split_batch",
]
