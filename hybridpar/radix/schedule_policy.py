"""Which waiting requests join the next prefill batch, and how many of their tokens (SGLang's schedule_policy).

Two pieces, both pure bookkeeping on rank 0 (no model, no communication):

:class:`SchedulePolicy` orders the waiting queue.

* ``fcfs``: arrival order.
* ``lpm`` (longest prefix match): requests with the longest cached prefix first, ties by arrival.
  Serving those first keeps their prefix hot (it is locked while they run) before LRU eviction
  can take it.
* LPM falls back to arrival order while the queue is longer than :data:`LPM_MAX_QUEUE`.

:class:`InBatchPrefixFilter` (part of LPM; FCFS stays the plain baseline) keeps one prefill batch
from computing the same uncached prefix twice. Candidates are checked in admission order against
a throwaway radix tree of the prompts already admitted to this batch (the chunked request, which
resumes first, among them). A candidate whose match in that tree is ``>= deprioritize_threshold``
tokens longer than its cache hit is *held back* for this step. The first request computes the
prefix and caches it; the held-back ones hit it next step. SGLang does this for LPM only, over the
whole queue, for candidates whose cache hit is short (its check threshold), and only sorts such
requests last (so they can still share a batch when the budget allows). Checking admitted requests
costs one length-only match per candidate whatever the queue length, so every candidate is
checked; and holding back makes "each shared prefix is prefilled once" hold for long queues
(where LPM orders by arrival), while a chunked prefix is still being computed, and whatever the
budget. Comparing the *gain* does not hold back requests whose prefix is already cached.

:class:`PrefillAdder` admits requests in that order under three budgets:

* rows: a free ``req_to_token`` row (``max_running_requests``);
* ``max_prefill_tokens`` new tokens per step, and ``chunked_prefill_size`` per step for chunking:
  a request longer than the remaining chunk budget gets a page-aligned chunk and becomes *the*
  chunked request, which resumes first in the next prefill step;
* KV memory: ``free + evictable - reserved >= new pages + reserve(request)``, where
  ``reserve(r) = ceil(new_token_ratio * remaining max_new_tokens)`` of every running and admitted
  request (room for their decode steps). Evictable cache counts as free: allocation evicts LRU
  leaves on demand. A request that does not fit waits (and so does everyone behind it).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from hybridpar.radix.allocation import alloc_for_extend, start_req
from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.radix_cache import RadixCache
from hybridpar.radix.radix_key import prompt_key, req_key
from hybridpar.core import ServeReq


LPM_MAX_QUEUE = 128  # SGLang's threshold: above it LPM skips the per-request prefix matching (acts as FCFS)


class SchedulePolicy:
    """Orders the waiting queue in place.

    LPM matches every waiting request against the tree each time a prefill batch is formed, so
    its cost grows with the queue; like SGLang, a queue longer than :data:`LPM_MAX_QUEUE` is
    served first-come first-served until it shrinks.
    """

    def __init__(self, policy: str, tree_cache: RadixCache) -> None:
        if policy not in ("lpm", "fcfs"):
            raise ValueError(f"schedule policy must be 'lpm' or 'fcfs', got {policy!r}")
        self.policy = policy
        self.tree_cache = tree_cache

    def calc_priority(self, waiting: list[ServeReq]) -> None:
        waiting.sort(key=lambda r: r.arrival_seq)
        if self.policy == "fcfs" or self.tree_cache.disable or len(waiting) > LPM_MAX_QUEUE:
            return
        cached = {id(r): self.tree_cache.prefix_len(prompt_key(r)) for r in waiting}
        waiting.sort(key=lambda r: -cached[id(r)])  # stable: ties keep arrival order


class InBatchPrefixFilter:
    """Holds back candidates that would recompute a prefix another request of this batch computes.

    Invariant: among the requests admitted through :meth:`admit`, no two share an uncached prefix
    of ``deprioritize_threshold`` tokens or more beyond their cache hits. The chunked request,
    always the first candidate, is admitted first, so a candidate sharing its uncached prefix
    waits for it too (its cache hit is then the chunks computed so far).
    """

    def __init__(self, tree_cache: RadixCache, deprioritize_threshold: int = 32) -> None:
        self.tree_cache = tree_cache
        self.deprioritize_threshold = deprioritize_threshold
        # A token trie (page_size 1, no KV) of the prompts this step computes.
        self.batch = RadixCache(ReqToTokenPool(1, 1), TokenToKVPoolAllocator(1, 1))

    def holds_back(self, req: ServeReq) -> bool:
        """Whether ``req`` (not admitted yet: it holds no row) should wait for a later step."""
        shared = self.batch.prefix_len(req_key(req, len(req.origin_input_ids) + len(req.output_ids)))
        if shared < self.deprioritize_threshold:  # shares too little with the batch: no need to ask the tree
            return False
        return shared - self.tree_cache.prefix_len(prompt_key(req)) >= self.deprioritize_threshold

    def admit(self, req: ServeReq) -> None:
        """Record that this step computes ``req``'s prompt."""
        ids = req.all_ids
        self.batch.insert(ids, torch.zeros(len(ids), dtype=torch.int64))


class AddResult(enum.Enum):
    CONTINUE = "continue"  # admitted; try the next request
    CHUNKED = "chunked"  # admitted a chunk; the batch is full
    NO_ROW = "no_row"  # no free req_to_token row
    NO_TOKEN = "no_token"  # not enough KV memory
    BUDGET = "budget"  # max_prefill_tokens / chunk budget spent


class PrefillAdder:
    """Builds one prefill batch: admits requests (``start_req`` + ``alloc_for_extend``) while budgets allow.

    After the calls, ``can_run[i]`` gets ``extend_lens[i]`` new tokens starting at
    ``prefix_lens[i]``, written to ``out_cache_loc[i]``; ``new_chunked_req`` is the request that
    got a partial chunk (if any); ``started`` lists requests that took a row in this step.
    """

    def __init__(self, tree_cache: RadixCache, running: Sequence[ServeReq], new_token_ratio: float,
                 max_prefill_tokens: int, chunked_prefill_size: int | None) -> None:
        self.tree_cache = tree_cache
        self.allocator = tree_cache.token_to_kv_pool_allocator
        self.page_size = tree_cache.page_size
        self.new_token_ratio = new_token_ratio
        self.rem_input_tokens = max_prefill_tokens
        self.rem_chunk_tokens = chunked_prefill_size
        self.reserved = sum(r.reserved_tokens(new_token_ratio) for r in running)
        self.nothing_running = not running
        self.can_run: list[ServeReq] = []
        self.prefix_lens: list[int] = []
        self.extend_lens: list[int] = []
        self.out_cache_loc: list[torch.Tensor] = []
        self.started: list[ServeReq] = []
        self.new_chunked_req: ServeReq | None = None

    def budget_tokens(self) -> int:
        """KV slots this batch may still take: free + evictable - reserved for decode."""
        return self.allocator.available_size() + self.tree_cache.evictable_size() - self.reserved

    def _release(self, req: ServeReq) -> None:
        """Undo ``start_req`` for a request that did not fit after all."""
        self.tree_cache.dec_lock_ref(req.last_node)
        self.tree_cache.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node = None, None
        req.prefix_indices = req.prefix_indices[:0]
        req.kv_len = req.cache_protected_len = 0

    def add_one_req(self, req: ServeReq) -> AddResult:
        """Admit ``req`` (or its next chunk if it already holds a row); see :class:`AddResult`."""
        fresh = req.req_pool_idx is None
        if fresh and not start_req(self.tree_cache, req):
            return AddResult.NO_ROW
        n = len(req.all_ids) - req.kv_len
        chunked = self.rem_chunk_tokens is not None and n > self.rem_chunk_tokens
        if chunked:
            n = self.rem_chunk_tokens // self.page_size * self.page_size
        if n <= 0 or (n > self.rem_input_tokens and self.can_run):
            if fresh:
                self._release(req)
            return AddResult.BUDGET
        reserve = 0 if chunked else req.reserved_tokens(self.new_token_ratio)
        pages = self.allocator.num_new_pages([req.kv_len], [req.kv_len + n]) * self.page_size
        alone = self.nothing_running and not self.can_run  # then only the pages must fit
        if pages + (0 if alone else reserve) > self.budget_tokens():
            if fresh:
                self._release(req)
            return AddResult.NO_TOKEN
        prefix_len = req.kv_len
        loc = alloc_for_extend(self.tree_cache, [req], [n])
        if loc is None:  # cannot happen: the budget counted only free and evictable slots
            raise RuntimeError(f"allocation of {n} tokens failed within the budget ({self.budget_tokens()})")
        if fresh:
            self.started.append(req)
        self.can_run.append(req)
        self.prefix_lens.append(prefix_len)
        self.extend_lens.append(n)
        self.out_cache_loc.append(loc)
        self.reserved += reserve
        self.rem_input_tokens -= n
        if self.rem_chunk_tokens is not None:
            self.rem_chunk_tokens -= n
        if chunked:
            self.new_chunked_req = req
            return AddResult.CHUNKED
        return AddResult.CONTINUE
