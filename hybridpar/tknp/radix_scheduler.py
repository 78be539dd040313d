"""TknpScheduler: RadixAttention serving with token parallelism -- a paged pool and a radix tree per TKNP rank.

:class:`~hybridpar.radix.scheduler.TPScheduler` serves one KV pool and one radix tree, decided on
TP rank 0 and replayed on the other TP ranks. Under token parallelism every rank of the TKNP
group holds the KV of *its own* requests, so the root keeps one scheduling state per TKNP rank:

* a :class:`~hybridpar.radix.radix_cache.RadixCache` over that rank's pool (prefix reuse happens
  among the requests of one rank), its waiting and running queues and its chunked request;
* the index structures of that rank's pool (``ReqToTokenPool`` + page allocator). For rank 0 they
  are the root's real pools; for the other ranks they are bookkeeping only -- the KV buffers live
  on the worker, which mirrors the index structures by replaying the root's op log
  (:mod:`hybridpar.radix.pool_sync`), shipped with each pass's plan.

One step: requests that arrived are *placed* on a TKNP rank (least reserved KV tokens among the
ranks whose pool can ever hold them; :class:`~hybridpar.tknp.placement.RequestPlacer`) and stay
there, preemptions included. Then every rank decides its own batch with TPScheduler's own policy
(prefill if it can admit, else decode, preempting when its pool runs dry), the batches are
concatenated into one forward pass over the model, and each rank processes its own rows of the
logits. A pass can so mix ranks that prefill with ranks that decode.

TPScheduler keeps the scheduling state of its single pool in plain attributes (``tree_cache``,
``waiting``, ``running``, ...). This subclass keeps one :class:`RankState` per TKNP rank and swaps
it into those attributes around each call to the inherited logic (:meth:`TknpScheduler.as_rank`),
so admission, chunking, eviction and preemption are exactly TPScheduler's. Outside such a call
rank 0's state is in place (so the inherited TP-follower path replays rank 0's pool changes).

Under TP x TKNP the roots form the TP group: TP rank 0 decides, the other roots follow
(TPScheduler's leader/follower protocol), and every root forwards the pool changes of rank ``j``
to its own TKNP group, whose rank ``j`` holds its TP share of the KV heads.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from hybridpar.distributed.parallel_state import GroupCoordinator
from hybridpar.radix.mem_pool import MHATokenToKVPool, ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.model_runner import ModelRunner
from hybridpar.radix.paged_backend import RadixAttentionBackend
from hybridpar.radix.pool_sync import (
    MemoryOp,
    RecordingReqToTokenPool,
    RecordingTokenToKVPoolAllocator,
    pool_digest,
)
from hybridpar.radix.schedule_policy import SchedulePolicy
from hybridpar.core import RequestResult, SchedulerLoad, StepPlan
from hybridpar.radix.scheduler import TPScheduler, _MeteredRadixCache
from hybridpar.core import ServeReq
from hybridpar.tknp.attention import AttentionGeometry, KVCapacity, TknpForwardBatch, TokenParallelAttention
from hybridpar.tknp.placement import RequestPlacer

_SWAPPED = ("req_to_token_pool", "allocator", "tree_cache", "policy", "waiting", "running", "chunked_req",
            "new_token_ratio", "_batch")


@dataclass
class RankState:
    """The scheduling state of one TKNP rank's pool, kept on the leading root."""

    req_to_token_pool: ReqToTokenPool
    allocator: TokenToKVPoolAllocator
    tree_cache: Any  # RadixCache
    policy: SchedulePolicy
    new_token_ratio: float
    ops: list[MemoryOp]  # pool changes not yet sent to the rank (empty for rank 0: TPScheduler ships them)
    waiting: list[ServeReq] = field(default_factory=list)
    running: list[ServeReq] = field(default_factory=list)
    chunked_req: ServeReq | None = None
    _batch: list[ServeReq] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running or self.chunked_req is not None)


@dataclass
class TknpStepPlan(StepPlan):
    """A pass over every rank's batch: entry ``i`` belongs to TKNP rank ``tknp_ranks[i]`` and indexes its pool.

    ``rank_plans[r]``: rank ``r``'s own plan (local sample rows), ``None`` if it runs nothing;
    ``rank_mem_ops[r]``: pool changes rank ``r`` (r >= 1) replays first. ``kind`` is ``"mixed"``
    for a pass, ``"sync"`` for pool changes alone.
    """

    tknp_ranks: list[int] = field(default_factory=list)
    rank_plans: list[StepPlan | None] = field(default_factory=list)
    rank_mem_ops: list[list[MemoryOp]] = field(default_factory=list)


class _PoolSize:
    """The two numbers TPScheduler._validate reads from an allocator."""

    def __init__(self, capacity: KVCapacity, page_size: int) -> None:
        self.num_pages = capacity.num_tokens // page_size
        self.size = self.num_pages * page_size


class TknpModelRunner(ModelRunner):
    """Executes a TKNP pass on a root: each row attends on the TKNP rank it was placed on; a ``"sync"``
    plan only forwards pool changes to the workers (every root, the TP followers' included)."""

    def __init__(self, base: ModelRunner, attn: TokenParallelAttention) -> None:
        super().__init__(base.model, base.backend, base.req_to_token_pool, base.kv_pool, base.device,
                         base.max_running_requests)
        self.attn = attn

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        if plan.kind == "sync":
            self.attn.sync(plan.rank_mem_ops)
            return None
        loc = torch.tensor(plan.out_cache_loc, dtype=torch.int64, device=self.device)
        fb = TknpForwardBatch.build_placed(self.attn, plan.tknp_ranks, plan.req_pool_indices, plan.prefix_lens,
                                           plan.extend_lens, self.device, out_cache_loc=loc)
        fb.rank_mem_ops = plan.rank_mem_ops
        return self.forward(plan, fb)


class TknpScheduler(TPScheduler):
    """Continuous-batching RadixAttention over a TKNP group; see the module docstring.

    Build it on every root (the TP group of TKNP rank-0 ranks) with the same arguments, while every
    other rank of the TKNP groups builds a paged :class:`~hybridpar.tknp.worker.AttentionWorker`
    (:func:`hybridpar.tknp.runner.build_paged_worker`). ``tknp_group``: this root's TKNP group.
    Call :meth:`shutdown` when done so the workers return. Extra attributes: ``attn``
    (:class:`TokenParallelAttention`), ``placer``, ``placement`` (rid -> TKNP rank, for every
    request ever placed), ``rank_states`` (leader only).
    """

    def __init__(self, model_wrapper: Any, tknp_group: GroupCoordinator | None, **overrides: Any) -> None:
        super().__init__(model_wrapper, **overrides)
        if self.args.use_cuda_graph:
            raise ValueError("use_cuda_graph is not supported with token parallelism; leave it False")
        tp = self.tp_group
        self.geometry = AttentionGeometry.from_config(self.model.config, tp.world_size, tp.rank_in_group,
                                                      self.model.dtype)
        param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.attn = TokenParallelAttention(self.backend, tknp_group, self.geometry, param_bytes)
        self.runner = TknpModelRunner(self.runner, self.attn)
        self.capacities = self.attn.capacities
        self.placement: dict[int, int] = {}
        self.placer = RequestPlacer(self.attn.num_ranks)
        if self.is_leader:
            self.rank_states = [self._state_from_attributes()] + [self._remote_state(c) for c in self.capacities[1:]]

    # ------------------------------------------------------------------ per-rank state
    def _state_from_attributes(self) -> RankState:
        return RankState(self.req_to_token_pool, self.allocator, self.tree_cache, self.policy, self.new_token_ratio,
                         [], self.waiting, self.running, self.chunked_req, self._batch)

    def _remote_state(self, capacity: KVCapacity) -> RankState:
        """Index structures of a worker's pool (no KV buffers here), recording every change for the worker."""
        a, ops = self.args, []
        rows = RecordingReqToTokenPool(capacity.num_slots, capacity.max_seq_len, "cpu", ops)
        allocator = RecordingTokenToKVPoolAllocator(capacity.num_tokens, a.page_size, "cpu", ops)
        tree = _MeteredRadixCache(rows, allocator, a.page_size, disable=a.disable_radix_cache)
        policy = SchedulePolicy(a.schedule_policy, tree)
        return RankState(rows, allocator, tree, policy, a.init_new_token_ratio, ops)

    @contextmanager
    def as_rank(self, rank: int) -> Iterator[RankState]:
        """Swap TKNP rank ``rank``'s scheduling state into TPScheduler's attributes (leader only)."""
        states = self.rank_states
        for name in _SWAPPED:  # rank 0's state lives in the attributes between calls
            setattr(states[0], name, getattr(self, name))
        for name in _SWAPPED:
            setattr(self, name, getattr(states[rank], name))
        try:
            yield states[rank]
        finally:
            for name in _SWAPPED:
                setattr(states[rank], name, getattr(self, name))
            for name in _SWAPPED:
                setattr(self, name, getattr(states[0], name))

    def _validate(self, ids: list[int], max_new_tokens: int, arrival_step: int) -> None:
        """TPScheduler's checks, against the largest pool of the group (a request must fit on some rank)."""
        own, largest = self.allocator, max(self.capacities, key=lambda c: c.num_tokens)
        self.allocator = _PoolSize(largest, self.args.page_size)
        try:
            super()._validate(ids, max_new_tokens, arrival_step)
        finally:
            self.allocator = own

    def _admit(self, req: ServeReq) -> None:
        """Place an arrived request on a TKNP rank (kept for its lifetime) and queue it there."""
        ps = self.args.page_size
        total = len(req.origin_input_ids) + req.sampling.max_new_tokens
        fits = [-(-(total - 1) // ps) <= s.allocator.num_pages for s in self.rank_states]
        rank = self.placer.place(req.rid, total, fits)
        self.placement[req.rid] = rank
        self.rank_states[rank].waiting.append(req)

    def busy(self) -> bool:
        return any(s.busy for s in self.rank_states)

    def _check_integrity(self) -> None:
        for rank in range(len(self.rank_states)):
            with self.as_rank(rank):
                super()._check_integrity()

    def _finish_run(self) -> None:
        sync = TknpStepPlan("sync")
        self._send(sync)  # the last frees reach the workers' mirrors (and the TP followers' workers)
        self.runner.execute(sync)
        self.metrics.evicted_tokens = sum(s.tree_cache.evicted_tokens for s in self.rank_states)

    def _send(self, plan: StepPlan) -> None:
        if isinstance(plan, TknpStepPlan):
            plan.rank_mem_ops = [[]] + [list(s.ops) for s in self.rank_states[1:]]
            for s in self.rank_states[1:]:
                s.ops.clear()
        super()._send(plan)

    def _get_next_batch(self) -> TknpStepPlan | None:
        """Every rank's own TPScheduler decision, concatenated into one pass."""
        merged = TknpStepPlan("mixed")
        for rank in range(len(self.rank_states)):
            with self.as_rank(rank):
                plan = super()._get_next_batch()
            merged.rank_plans.append(plan)
            if plan is None:
                continue
            offset = len(merged.rids)
            for name in ("rids", "req_pool_indices", "prefix_lens", "extend_lens", "input_ids", "out_cache_loc"):
                getattr(merged, name).extend(getattr(plan, name))
            merged.sample_rows.extend(offset + i for i in plan.sample_rows)
            merged.tknp_ranks.extend([rank] * len(plan.rids))
        return merged if merged.rids else None

    def _process_batch_result(self, plan: StepPlan, logits: torch.Tensor | None,
                              results: dict[int, RequestResult]) -> None:
        row = 0
        for rank, rank_plan in enumerate(plan.rank_plans):
            if rank_plan is None:
                continue
            n = len(rank_plan.sample_rows)
            mine = None if logits is None or n == 0 else logits[row:row + n]
            row += n
            before = set(results)
            with self.as_rank(rank):
                super()._process_batch_result(rank_plan, mine, results)
            for rid in set(results) - before:
                self.placer.release(rid)

    def live_requests(self) -> list[ServeReq]:
        """Every request held, on every TKNP rank."""
        live: list[ServeReq] = []
        for rank in range(len(self.rank_states)):
            with self.as_rank(rank):
                live += super().live_requests()
        return live

    def abort(self, rid: int | str) -> RequestResult | None:
        """TPScheduler's abort on the TKNP rank the request was placed on."""
        rank = self.placement.get(rid)
        if rank is None:
            return None
        with self.as_rank(rank):
            result = super().abort(rid)
        if result is not None:
            self.placer.release(rid)
        return result

    def load(self) -> SchedulerLoad:
        """TPScheduler's load summed over the TKNP group's ranks."""
        total = SchedulerLoad()
        for rank in range(len(self.rank_states)):
            with self.as_rank(rank):
                total += super().load()
        return total

    # ------------------------------------------------------------------ inspection
    def rank_digests(self) -> list[dict[str, Any]]:
        """Leader: the index-pool state of every rank (free pages and rows, req_to_token hash), to compare
        with each worker's mirror (:meth:`hybridpar.tknp.worker.AttentionWorker.pool_digest`)."""
        out = []
        for s in self.rank_states:
            d = pool_digest(s.req_to_token_pool, s.allocator, torch.zeros(0, dtype=torch.bool))
            out.append({k: d[k] for k in ("free_pages", "free_rows", "req_to_token")})
        return out

    def release_workers(self) -> None:
        """End the workers' ``serve()`` after a run; they keep their pools for the next (collective)."""
        self.attn.release()

    def shutdown(self) -> None:
        """Release the attention workers for good (collective over the TKNP group)."""
        self.attn.shutdown()


def build_paged_worker_backend(geometry: AttentionGeometry, num_tokens: int, page_size: int, max_running_requests: int,
                               max_context_len: int, device: torch.device | str
                               ) -> tuple[RadixAttentionBackend, tuple[ReqToTokenPool, TokenToKVPoolAllocator]]:
    """A worker's paged cache: KV buffers for its TP share of the heads, and the mirror index pools."""
    rows = ReqToTokenPool(max_running_requests, max_context_len, device)
    allocator = TokenToKVPoolAllocator(num_tokens, page_size, device)
    kv = MHATokenToKVPool(num_tokens, page_size, geometry.dtype, geometry.num_kv_heads, geometry.head_dim,
                          geometry.num_layers, device)
    return RadixAttentionBackend(rows, kv), (rows, allocator)
