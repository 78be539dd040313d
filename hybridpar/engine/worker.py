"""EngineWorker: what one rank of an engine holds and does, for every layout.

Built once per rank (by :class:`~hybridpar.distributed.rank_pool.RankPool` for ``LLM``, or in each
``torchrun`` rank), after which ``generate`` is called on every rank with the same arguments:

==========================  ===========================================================  =========================
layout                      this rank holds                                              in ``generate`` it
==========================  ===========================================================  =========================
TP (and each DP replica)    a TP shard of the model, a paged KV pool; TP rank 0 also     serves its replica's
                            the radix tree and the queues (:class:`TPScheduler`)         requests (lead / follow)
TKNP root (TP x TKNP)       a TP shard, its own pool, and one scheduling state per      serves the group's
                            TKNP rank (:class:`TknpScheduler`)                           requests, then releases
                                                                                         its attention workers
TKNP worker                 no weights; a paged KV pool for the requests placed on it   attends until released
                            (:class:`~hybridpar.tknp.worker.AttentionWorker`)
==========================  ===========================================================  =========================

Only one rank per replica -- TP rank 0 of the TKNP root group, or of each DP replica -- returns
results; the others return ``None``. That rank also reports each finished request to the parent
(:func:`~hybridpar.distributed.rank_pool.report_progress`) for the progress bar.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

from hybridpar.distributed.parallel_state import (
    get_ep_group,
    get_data_parallel_rank,
    get_tknp_group,
    get_tp_group,
    initialize_model_parallel,
)
from hybridpar.distributed.rank_pool import read_inbox, report_progress
from hybridpar.engine.config import EngineConfig
from hybridpar.engine.online import serve_online
from hybridpar.core import SamplingParams
from hybridpar.core import RequestResult
from hybridpar.radix.scheduler import TPScheduler

EngineRequest = tuple[list[int], SamplingParams]  # prompt token ids, sampling parameters


class EngineWorker:
    """One rank of the engine described by ``config`` (see the module docstring)."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        initialize_model_parallel(tensor_parallel_size=config.tensor_parallel_size,
                                  token_parallel_size=config.token_parallel_size,
                                  data_parallel_size=config.data_parallel_size,
                                  enable_token_parallel=config.token_parallel)
        self.replica = 0 if config.token_parallel else get_data_parallel_rank()
        tknp = get_tknp_group() if config.token_parallel else None
        self.attention_worker = None
        self.scheduler: TPScheduler | None = None
        if tknp is not None and not tknp.is_first_rank:
            self.attention_worker = self._build_attention_worker()
        else:
            self.scheduler = self._build_scheduler()
        self.is_reporter = self.scheduler is not None and get_tp_group().rank_in_group == 0

    # ------------------------------------------------------------------ building
    def _setup(self, model: Any) -> Any:
        from hybridpar.tknp.runner import TknpSetup

        c = self.config
        return TknpSetup(model_name=c.model, tensor_parallel_size=c.tensor_parallel_size,
                         token_parallel_size=c.token_parallel_size, max_seq_len=c.context_len(model),
                         max_requests_per_rank=c.max_num_seqs, dtype=c.torch_dtype_name,
                         enable_expert_parallel=c.enable_expert_parallel)

    def _build_scheduler(self) -> TPScheduler:
        from hybridpar.models.config import ModelConfig
        from hybridpar.models.default_checkpoint import resolve_model
        from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper

        c = self.config
        model = ModelConfig.from_pretrained(resolve_model(c.model))
        args = asdict(c.server_args(model))
        if c.token_parallel:
            from hybridpar.tknp.runner import build_tknp_scheduler

            for sized in ("page_size", "max_total_tokens", "max_running_requests", "max_context_len"):
                args.pop(sized)  # the TKNP plan sizes every rank's pool
            return build_tknp_scheduler(self._setup(model), page_size=c.page_size, **args)
        wrapper = TPRadixAttentionModelWrapper(c.model, dtype=c.torch_dtype_name, tp_group=get_tp_group(),
                                               page_size=c.page_size,
                                               ep_group=get_ep_group() if c.enable_expert_parallel else None)
        return TPScheduler(wrapper, **args)

    def _build_attention_worker(self) -> Any:
        from hybridpar.models.config import ModelConfig
        from hybridpar.models.default_checkpoint import resolve_model
        from hybridpar.tknp.runner import build_paged_worker

        model = ModelConfig.from_pretrained(resolve_model(self.config.model))
        return build_paged_worker(self._setup(model), page_size=self.config.page_size)

    # ------------------------------------------------------------------- serving
    def generate(self, requests_per_replica: list[list[EngineRequest]]) -> list[RequestResult] | None:
        """Serve this rank's replica's requests to completion; results in request order on the reporter."""
        if self.attention_worker is not None:
            self.attention_worker.serve()
            return None
        sched = self.scheduler
        assert sched is not None
        rids = [sched.add_request(ids, sampling=params) for ids, params in requests_per_replica[self.replica]]
        if self.is_reporter:
            sched.on_request_finished = lambda r: report_progress((self.replica, len(r.output_ids)))
        results = sched.process_requests()
        self._release_attention_workers()
        return [results[rid] for rid in rids] if self.is_reporter else None

    def serve(self) -> dict[str, Any] | None:
        """Serve online until the parent posts ``stop`` (:mod:`hybridpar.engine.online`); returns :meth:`stats`."""
        if self.attention_worker is not None:
            self.attention_worker.serve()
            return None
        sched = self.scheduler
        assert sched is not None
        if self.is_reporter:
            sched.on_request_finished = None  # reports are StepReports now, not progress-bar ticks
            serve_online(sched, self.replica, read_inbox, report_progress)
        else:
            sched.process_requests()  # follow the leader's plans until its ``done`` plan
        self._release_attention_workers()
        return self.stats()

    def _release_attention_workers(self) -> None:
        """Under TKNP, end the attention workers' ``serve()`` after a run (they keep their pools)."""
        release = getattr(self.scheduler, "release_workers", None)
        if release is not None:
            release()

    def stats(self) -> dict[str, Any] | None:
        """The reporter's cumulative scheduler metrics (cache hit rate, tokens, preemptions)."""
        if not self.is_reporter:
            return None
        assert self.scheduler is not None
        return {"replica": self.replica, **asdict(self.scheduler.metrics),
                "cache_hit_rate": self.scheduler.metrics.cache_hit_rate}
