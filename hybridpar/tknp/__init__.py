"""Chapter 6: token parallelism (TKNP).

The root rank of each token-parallel group runs the whole model (its TP share of it) for the
whole batch, but attention is spread by request: every rank of the group attends for the
requests whose KV cache it holds. Non-root ranks hold no weights, only KV cache.

* :mod:`.placement` -- which rank holds a request's KV (balance KV tokens; stable placement).
* :mod:`.attention` -- :class:`TokenParallelAttention`, the root's backend: scatterv Q/K/V by
  request, attend locally, gatherv the outputs, restore the order.
* :mod:`.worker` -- :class:`AttentionWorker`, a non-root rank: KV cache + attention, no model.
* :mod:`.engine` -- :class:`TknpEngine`, continuous batching on the roots.
* :mod:`.memory` -- weights and KV capacity per rank for TP, DP and TKNP.
* :mod:`.runner` -- bringing up a root or a worker from a :class:`TknpSetup`.
* :mod:`.cli` -- ``python -m hybridpar.tknp.cli``, the seed's command line; ``run_demo``.
* :mod:`.verify` -- ``python -m hybridpar.tknp.verify``: TKNP versus TP 1 correctness table.
"""

from hybridpar.tknp.attention import (
    AttentionGeometry,
    KVCapacity,
    StepPlan,
    SubBatch,
    TknpForwardBatch,
    TokenParallelAttention,
    split_batch,
)
from hybridpar.tknp.engine import Request, RequestOutput, TknpEngine
from hybridpar.tknp.memory import MemoryPlan, RankMemory, compare_strategies, format_memory_table, plan_memory
from hybridpar.tknp.placement import RequestPlacer, least_loaded, place_all
from hybridpar.tknp.worker import AttentionWorker, WorkerStats

__all__ = [
    "AttentionGeometry",
    "AttentionWorker",
    "KVCapacity",
    "MemoryPlan",
    "RankMemory",
    "Request",
    "RequestOutput",
    "RequestPlacer",
    "StepPlan",
    "SubBatch",
    "TknpEngine",
    "TknpForwardBatch",
    "TokenParallelAttention",
    "WorkerStats",
    "compare_strategies",
    "format_memory_table",
    "least_loaded",
    "place_all",
    "plan_memory",
    "split_batch",
]
