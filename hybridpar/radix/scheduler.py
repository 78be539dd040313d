"""TPScheduler: continuous batching over RadixAttention, decided on TP rank 0 and replayed on every rank.

Usage (SPMD: every rank of the TP group runs the same lines)::

    sched = TPScheduler(TPRadixAttentionModelWrapper(model_name, page_size=16))
    rid = sched.add_request("What is AI?", max_new_tokens=20)     # same rid on every rank
    results = sched.process_requests()                             # {rid: RequestResult}, every rank

Roles. Rank 0 owns the waiting queue, the running batch, the radix tree and the pools' free lists.
Each step it decides a :class:`StepPlan` (which requests, which token ids, which KV slots) and
broadcasts it with ``broadcast_object``; the plan also carries the log of every pool change rank 0
made since the last plan (:mod:`hybridpar.radix.pool_sync`). The other ranks run a follower loop
inside ``process_requests``: replay the pool changes on their mirror pools, run the same forward
(storing *their* KV heads at the same slots), take part in the logits all-gather, repeat until
the ``done`` plan, which carries the results, so every rank returns the same dict. Sampling
happens on rank 0 only; the sampled tokens reach the other ranks as the next plan's input ids.

One step (SGLang's event loop, without overlap; :meth:`TPScheduler.step`, also driven online by
:mod:`hybridpar.engine.online`):

1. requests whose ``arrival_step`` has come join the waiting queue (continuous batching);
2. prefill first: the policy orders the queue, the :class:`PrefillAdder` admits what fits (the
   chunked request first); finished prompts are inserted into the tree right away
   (``cache_unfinished_req``) so later requests hit them;
3. otherwise decode every running request by one token. If the pool cannot give each a slot even
   after eviction, running requests are preempted (fewest outputs first): their KV goes to the
   tree as evictable cache, they go back to the waiting queue and later resume where they were.

Memory pressure, in order: evict unlocked cache (inside allocation); make waiting requests wait
(the adder's budget); preempt running ones. A request that could never fit is rejected by
``add_request`` (:class:`RequestTooLargeError`); nothing else is affected.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable

import torch

from hybridpar.core import (RequestResult, RequestTooLargeError, SamplingParams, SchedulerLoad, SchedulerMetrics,
                            ServeReq, StepPlan, StepRecord)
from hybridpar.radix.allocation import alloc_for_decode
from hybridpar.radix.mem_pool import MHATokenToKVPool, pool_tokens
from hybridpar.radix.model_runner import ModelRunner
from hybridpar.radix.paged_backend import RadixAttentionBackend
from hybridpar.radix.pool_sync import pool_digest
from hybridpar.radix.radix_cache import RadixCache
from hybridpar.radix.schedule_policy import AddResult, InBatchPrefixFilter, PrefillAdder, SchedulePolicy
from hybridpar.config import ServerArgs
from hybridpar.radix.step_sync import StepSync


class _MeteredRadixCache(RadixCache):
    """A RadixCache that counts the tokens it evicts."""

    evicted_tokens = 0

    def evict(self, num_tokens: int) -> int:
        self.evicted_tokens += (freed := super().evict(num_tokens))
        return freed


class TPScheduler:
    """Continuous-batching RadixAttention server over a :class:`TPRadixAttentionModelWrapper`.

    ``overrides`` replace fields of the wrapper's :class:`ServerArgs` (e.g. ``max_total_tokens=256``),
    so one loaded model can back several schedulers. Rank 0 attributes: ``tree_cache``, ``policy``,
    ``waiting``, ``running``, ``chunked_req``, ``step_log``. Every rank: ``args``, ``metrics``,
    ``req_to_token_pool``, ``allocator``, ``kv_pool``, ``backend``, :meth:`pool_digest`.
    """

    def __init__(self, model_wrapper: Any, **overrides: Any) -> None:
        self.wrapper = model_wrapper
        self.args: ServerArgs = replace(model_wrapper.server_args, **overrides)
        self.model = model_wrapper.model
        self.tp_group = model_wrapper.tp_group
        self.device = torch.device(model_wrapper.device)
        self.is_leader = self.tp_group.rank_in_group == 0
        config = self.model.config
        self.max_context_len = self.args.max_context_len or config.max_position_embeddings
        self.eos_token_ids = set(config.eos_token_ids)
        ps = self.args.page_size
        size = pool_tokens(self.args, config, self.model.num_kv_heads_per_rank, self.model.dtype, self.device,
                           self.tp_group)
        self.sync = StepSync(self.tp_group, size, ps, self.args.max_running_requests, self.max_context_len, self.device)
        self.req_to_token_pool, self.allocator = self.sync.req_to_token_pool, self.sync.allocator
        self.kv_pool = MHATokenToKVPool(size, ps, self.model.dtype, self.model.num_kv_heads_per_rank,
                                        config.head_dim, config.num_layers, self.device)
        self.backend = RadixAttentionBackend(self.req_to_token_pool, self.kv_pool, check_reads=self.args.debug_checks)
        self.runner = ModelRunner(self.model, self.backend, self.req_to_token_pool, self.kv_pool, self.device,
                                  self.args.max_running_requests, self.args.use_cuda_graph, self.args.attention_backend)
        self.metrics = SchedulerMetrics()
        self.on_request_finished: Callable[[RequestResult], None] | None = None  # rank 0 (progress bars)
        self.on_token: Callable[[ServeReq, int], None] | None = None  # rank 0: each sampled token (streaming)
        self._next_rid = 0
        if self.is_leader:
            self.tree_cache = _MeteredRadixCache(self.req_to_token_pool, self.allocator, ps,
                                                 disable=self.args.disable_radix_cache)
            self.policy = SchedulePolicy(self.args.schedule_policy, self.tree_cache)
            self.new_token_ratio = self.args.init_new_token_ratio
            self.pending: list[ServeReq] = []
            self.waiting: list[ServeReq] = []
            self.running: list[ServeReq] = []
            self.chunked_req: ServeReq | None = None
            self.step_log: list[StepRecord] = []
            self._batch: list[ServeReq] = []  # the requests of the step being executed
            self._arrivals = 0

    # ----------------------------------------------------------------- requests
    def add_request(self, prompt: str | list[int], max_new_tokens: int | None = None,
                    sampling: SamplingParams | None = None, *, arrival_step: int = 0) -> int:
        """Queue a request (text or token ids); returns its id. Call it on every rank with the same arguments.

        ``sampling`` defaults to greedy; ``max_new_tokens`` overrides its field (default 32).
        ``arrival_step``: the request joins the waiting queue after that many steps of the next
        :meth:`process_requests` (0: at once), to simulate requests arriving while others run.
        """
        if sampling is None:
            sampling = SamplingParams(max_new_tokens=32 if max_new_tokens is None else max_new_tokens)
        elif max_new_tokens is not None:
            sampling = replace(sampling, max_new_tokens=max_new_tokens)
        if isinstance(prompt, str):
            text, ids = prompt, self.wrapper.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        self._validate(ids, sampling.max_new_tokens, arrival_step)
        rid = self._next_rid
        self._next_rid += 1
        if self.is_leader:
            self.pending.append(ServeReq(rid, ids, sampling=sampling, arrival_step=arrival_step, prompt_text=text))
        return rid

    def _validate(self, ids: list[int], max_new_tokens: int, arrival_step: int) -> None:
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if isinstance(arrival_step, bool) or not isinstance(arrival_step, int) or arrival_step < 0:
            raise ValueError(f"arrival_step must be an int >= 0, got {arrival_step!r}")
        total = len(ids) + max_new_tokens
        if total > self.max_context_len:
            raise RequestTooLargeError(f"prompt ({len(ids)}) + max_new_tokens ({max_new_tokens}) = {total} tokens exceed "
                                       f"max_context_len={self.max_context_len}; shorten the prompt or max_new_tokens")
        need_pages = -(-(total - 1) // self.args.page_size)
        if need_pages > self.allocator.num_pages:
            raise RequestTooLargeError(
                f"request needs {need_pages} KV pages ({total - 1} tokens, page_size={self.args.page_size}) but the "
                f"pool has {self.allocator.num_pages} ({self.allocator.size} tokens): it could never run. Raise "
                f"max_total_tokens (or mem_fraction_static), use more TP ranks, or shorten the prompt / max_new_tokens")

    # -------------------------------------------------------------- main loops
    def process_requests(self) -> dict[int, RequestResult]:
        """Serve every added request to completion; returns ``{rid: RequestResult}`` in rid order.

        On rank 0 this runs the scheduling loop; on the other ranks the follower loop. Both
        return the same results (shipped with the final ``done`` plan). Call it on every rank.
        """
        # A failure raises out of here on whichever rank it happens. It is never announced to the
        # other ranks through the TP group: they may be inside a collective of the step (the
        # forward's all-gather), and a second collective would hang them. The process runner
        # reports it out of band and ends the ranks (hybridpar.distributed.rank_pool, launch, torchrun).
        return self._lead() if self.is_leader else self._follow()

    def _follow(self) -> dict[int, RequestResult]:
        while True:
            plan = self.sync.receive()
            if plan.kind == "done":
                results, self.metrics = plan.payload
                return results
            self.runner.execute(plan)

    def _send(self, plan: StepPlan) -> None:
        """The leader's plan goes out (TknpScheduler adds its workers' pool changes first)."""
        self.sync.send(plan)

    def _lead(self) -> dict[int, RequestResult]:
        start = time.perf_counter()
        pending = sorted(self.pending, key=lambda r: (r.arrival_step, r.rid))
        self.pending = []
        results: dict[int, RequestResult] = {}
        step = 0
        while pending or self.busy():
            while pending and pending[0].arrival_step <= step:
                self.arrive(pending.pop(0))
            if not self.step(results):
                if pending and not self.busy():
                    step = pending[0].arrival_step  # idle until the next arrival
                    continue
                raise RuntimeError(f"{type(self).__name__} stalled: requests wait and nothing can run")
            step += 1
        self.finish(results, start)
        return dict(sorted(results.items()))

    # ------------------------------------------- one step at a time (rank 0; the online loop drives these too)
    def arrive(self, req: ServeReq) -> None:
        """A request joins the waiting queue now (its arrival time and FCFS order are stamped)."""
        req.arrival_seq, req.arrival_time = self._arrivals, time.perf_counter()
        self._arrivals += 1
        self._admit(req)

    def step(self, results: dict[int, RequestResult]) -> bool:
        """Decide, broadcast and run one step; finished requests go to ``results``. False: nothing could run."""
        plan = self._get_next_batch()
        if plan is None:
            return False
        self._send(plan)
        logits = self.runner.execute(plan)
        self._process_batch_result(plan, logits, results)
        if self.args.debug_checks:
            self._check_integrity()
        return True

    def finish(self, results: dict[int, RequestResult], start: float) -> None:
        """After the last step: metrics, then the ``done`` plan that ends the followers' loop."""
        self._finish_run()
        self.metrics.wall_s += time.perf_counter() - start
        self._send(StepPlan("done", payload=(dict(sorted(results.items())), self.metrics)))

    def submit(self, rid: int | str, ids: list[int], sampling: SamplingParams) -> None:
        """Rank 0, online: check a request (:class:`RequestTooLargeError` if it can never run) and queue it now."""
        self._validate(ids, sampling.max_new_tokens, 0)
        self.arrive(ServeReq(rid, list(ids), sampling=sampling))

    def live_requests(self) -> list[ServeReq]:
        """Every request held: waiting, running, half prefilled."""
        return self.waiting + self.running + ([self.chunked_req] if self.chunked_req is not None else [])

    def abort(self, rid: int | str) -> RequestResult | None:
        """Drop request ``rid`` (between steps); its KV goes to the tree as cache. Its result, or ``None``."""
        req = next((r for r in self.live_requests() if r.rid == rid), None)
        if req is None:
            return None
        if req.req_pool_idx is not None:  # it holds a row (running, or a prefill chunk done)
            self.tree_cache.cache_finished_req(req)
        self.waiting, self.running = [r for r in self.waiting if r is not req], [r for r in self.running if r is not req]
        self.chunked_req = None if req is self.chunked_req else self.chunked_req
        req.finish_reason, req.finish_time = "abort", time.perf_counter()
        return self._result(req)

    def load(self) -> SchedulerLoad:
        """Requests running and waiting, and KV tokens held by requests (evictable cache counts as free)."""
        a, total = self.allocator, self.allocator.size
        used = total - a.available_size() - self.tree_cache.evictable_size()
        running = len(self.running) + (self.chunked_req is not None)
        return SchedulerLoad(running, len(self.waiting), used, total)

    # ------------------------------------------- the loop's hooks (TknpScheduler: one state per TKNP rank)
    def busy(self) -> bool:
        """Whether a request waits, runs or is half prefilled."""
        return bool(self.waiting or self.running or self.chunked_req is not None)

    def _admit(self, req: ServeReq) -> None:
        """An arrived request joins the waiting queue."""
        self.waiting.append(req)

    def _check_integrity(self) -> None:
        """``debug_checks``: the cache's integrity check after a step, with every request holding a row."""
        self.tree_cache.check_integrity(self.running + ([self.chunked_req] if self.chunked_req else []))

    def _finish_run(self) -> None:
        """After the last step, before the results go out."""
        self.metrics.evicted_tokens = self.tree_cache.evicted_tokens

    # --------------------------------------------------------------- scheduling
    def _get_next_batch(self) -> StepPlan | None:
        if self.waiting or self.chunked_req is not None:
            plan = self._prefill_batch()
            if plan is not None:
                return plan
        if self.running:
            return self._decode_batch()
        return None

    def _prefill_batch(self) -> StepPlan | None:
        a = self.args
        self.policy.calc_priority(self.waiting)
        adder = PrefillAdder(self.tree_cache, self.running, self.new_token_ratio, a.max_prefill_tokens,
                             a.chunked_prefill_size)
        in_batch = None
        if a.in_batch_prefix_caching and a.schedule_policy == "lpm" and not self.tree_cache.disable:
            in_batch = InBatchPrefixFilter(self.tree_cache, a.in_batch_deprioritize_threshold)
        for req in ([self.chunked_req] if self.chunked_req else []) + self.waiting:
            if in_batch is not None and req.req_pool_idx is None and in_batch.holds_back(req):
                continue
            result = adder.add_one_req(req)
            if result is AddResult.CONTINUE and in_batch is not None:
                in_batch.admit(req)
            if result is not AddResult.CONTINUE:
                break
        if not adder.can_run:
            return None
        admitted = set(map(id, adder.can_run))
        self.waiting = [r for r in self.waiting if id(r) not in admitted]
        if self.chunked_req is not None and id(self.chunked_req) in admitted:
            self.chunked_req = None
        if adder.new_chunked_req is not None:
            self.chunked_req = adder.new_chunked_req
        for req, prefix in zip(adder.can_run, adder.prefix_lens):
            if req in adder.started and req.cached_tokens is None:  # first admission
                req.cached_tokens = prefix
                self.metrics.prompt_tokens += len(req.origin_input_ids)
                self.metrics.cached_prompt_tokens += prefix
        self.metrics.prefill_tokens_computed += sum(adder.extend_lens)
        self.metrics.prefill_steps += 1
        reqs = adder.can_run
        return self._plan("prefill", reqs, adder.prefix_lens, adder.extend_lens, torch.cat(adder.out_cache_loc),
                          [i for i, r in enumerate(reqs) if r.kv_len == len(r.all_ids)])

    def _decode_batch(self) -> StepPlan:
        self._retract_if_needed()
        reqs = list(self.running)
        prefix_lens = [r.kv_len for r in reqs]
        loc = alloc_for_decode(self.tree_cache, reqs)
        if loc is None:  # cannot happen: _retract_if_needed made room
            raise RuntimeError("decode allocation failed after preemption")
        self.new_token_ratio = max(self.args.min_new_token_ratio, self.new_token_ratio - self.args.new_token_ratio_decay)
        self.metrics.decode_tokens += len(reqs)
        self.metrics.decode_steps += 1
        return self._plan("decode", reqs, prefix_lens, [1] * len(reqs), loc, list(range(len(reqs))))

    def _plan(self, kind: str, reqs: list[ServeReq], prefix_lens: list[int], extend_lens: list[int],
              loc: torch.Tensor, sample_rows: list[int]) -> StepPlan:
        self._batch = reqs
        input_ids = [t for r, p, n in zip(reqs, prefix_lens, extend_lens) for t in r.all_ids[p:p + n]]
        self.step_log.append(StepRecord(kind, [r.rid for r in reqs], list(prefix_lens), list(extend_lens),
                                        self.allocator.available_size(), self.tree_cache.evictable_size(),
                                        len(self.running), len(self.waiting)))
        return StepPlan(kind, rids=[r.rid for r in reqs], req_pool_indices=[r.req_pool_idx for r in reqs],
                        prefix_lens=list(prefix_lens), extend_lens=list(extend_lens), input_ids=input_ids,
                        out_cache_loc=loc.tolist(), sample_rows=sample_rows)

    def _retract_if_needed(self) -> None:
        """Preempt running requests (fewest outputs, then longest prompt first) until one decode step fits."""
        ps = self.args.page_size

        def short() -> bool:
            need = sum(1 for r in self.running if r.kv_len % ps == 0) * ps
            return need > self.allocator.available_size() + self.tree_cache.evictable_size()

        while short():
            if len(self.running) > 1:
                victim = min(self.running, key=lambda r: (len(r.output_ids), -len(r.origin_input_ids)))
                self.running.remove(victim)
            elif self.chunked_req is not None:
                victim, self.chunked_req = self.chunked_req, None
            else:
                raise RuntimeError("a lone request cannot decode: the pool is smaller than add_request checked")
            self.tree_cache.cache_finished_req(victim)  # its KV stays as evictable cache
            victim.reset_for_retract()
            self.waiting.append(victim)
            self.metrics.preemptions += 1
            self.new_token_ratio = self.args.init_new_token_ratio

    # ------------------------------------------------------------- results (rank 0)
    def _process_batch_result(self, plan: StepPlan, logits: torch.Tensor | None,
                              results: dict[int, RequestResult]) -> None:
        sampled = [self._batch[i] for i in plan.sample_rows]
        tokens = self.runner.sample(logits, [r.sampling for r in sampled], [r.generator for r in sampled])
        now = time.perf_counter()
        for req, tok in zip(sampled, tokens):
            req.output_ids.append(tok)
            if req.first_token_time is None:
                req.first_token_time = now
            self.metrics.generated_tokens += 1
            if tok in self.eos_token_ids and not req.sampling.ignore_eos:
                req.finish_reason = "eos"
            elif req.sampling.stop and any(x in self.wrapper.decode(req.output_ids) for x in req.sampling.stop):
                req.finish_reason = "stop"  # the engine cuts the text before the stop string
            elif req.remaining_new_tokens <= 0:
                req.finish_reason = "length"
            if req.finish_reason is not None:
                self.tree_cache.cache_finished_req(req)
                if req in self.running:
                    self.running.remove(req)
                req.finish_time = now
                results[req.rid] = self._result(req)
                self.metrics.finished_requests += 1
                if self.on_request_finished is not None:
                    self.on_request_finished(results[req.rid])
            elif plan.kind == "prefill":
                self.tree_cache.cache_unfinished_req(req)  # share the prompt with later requests now
                self.running.append(req)
            if self.on_token is not None:
                self.on_token(req, tok)
        if self.chunked_req is not None and self.chunked_req in self._batch:
            self.tree_cache.cache_unfinished_req(self.chunked_req)  # its chunks so far become shareable

    def _result(self, req: ServeReq) -> RequestResult:
        text = self.wrapper.decode(req.output_ids) if req.prompt_text is not None else None
        first = req.first_token_time or req.finish_time  # an aborted request may have no token yet
        return RequestResult(req.rid, list(req.origin_input_ids), list(req.output_ids), req.finish_reason,
                             req.cached_tokens or 0, req.num_preemptions, first - req.arrival_time,
                             req.finish_time - req.arrival_time, text)

    # --------------------------------------------------------------- inspection
    def pool_digest(self) -> dict[str, Any]:
        """This rank's pool state summary (:func:`hybridpar.radix.pool_sync.pool_digest`); equal on all ranks."""
        return pool_digest(self.req_to_token_pool, self.allocator, self.backend.filled)
