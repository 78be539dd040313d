"""The serving engine: one ``LLM`` for every layout (TP, DP, TKNP, TP x TKNP), radix cache on or off.

===========================  ==================================================================
module                       what it owns
===========================  ==================================================================
:mod:`.config`               :class:`EngineConfig`: every setting, checked before a rank starts
:mod:`.outputs`              :class:`RequestOutput` and friends, shaped like vLLM's
:mod:`.worker`               :class:`EngineWorker`: what one rank builds and does per call
:mod:`.llm`                  :class:`LLM`: the parent side (tokenizer, checks, DP split, results)
===========================  ==================================================================

Underneath: :class:`~hybridpar.distributed.rank_pool.RankPool` keeps the ranks alive between calls,
and each replica is served by :class:`~hybridpar.radix.scheduler.TPScheduler` (TP) or its
token-parallel form :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`.
"""
from hybridpar.engine.config import EngineConfig
from hybridpar.engine.llm import LLM
from hybridpar.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from hybridpar.engine.worker import EngineWorker

__all__ = ["LLM", "EngineConfig", "EngineWorker", "RequestOutput", "CompletionOutput", "RequestMetrics"]
