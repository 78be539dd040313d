"""Request-level KV allocation on top of a RadixCache (SGLang's ``alloc_for_extend`` family).

The life of a request, in calls::

    start_req(cache, req)                        # row + cached prefix (locked) written into the row
    loc = alloc_for_extend(cache, [req], [n])    # slots for the next n prompt tokens (a prefill chunk)
    cache.cache_unfinished_req(req)              # optional, after a chunk: share it with others
    ...                                          # more chunks until kv_len == len(prompt); sample
    loc = alloc_for_decode(cache, [req])         # one slot for the token fed to each decode step
    cache.cache_finished_req(req)                # give the KV to the tree, free the rest

``loc`` (``out_cache_loc``) lists, batch-concatenated, the slots where the forward pass
writes the new tokens' K/V (:meth:`MHATokenToKVPool.set_kv_buffer`). Allocation evicts
least recently used cache entries when the free list is short; when even that is not
enough it returns ``None`` and changes nothing in the requests or the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hybridpar.radix.radix_cache import RadixCache
from hybridpar.core import Req


def start_req(cache: RadixCache, req: Req) -> bool:
    """Admit ``req``: take a req_to_token row, match and lock its cached prefix.

    The match leaves at least one token to compute (see
    :meth:`RadixCache.match_prefix_for_req`). Afterwards ``kv_len == cache_protected_len
    == len(req.prefix_indices)``. Returns ``False`` (nothing changed) if no row is free.
    """
    if req.req_pool_idx is not None:
        raise ValueError(f"request {req.rid!r} already holds row {req.req_pool_idx}; start_req() runs once per request.")
    pool = cache.req_to_token_pool
    if len(req.all_ids) > pool.max_context_len:
        raise ValueError(
            f"request {req.rid!r} has {len(req.all_ids)} tokens but max_context_len={pool.max_context_len}; "
            f"build the ReqToTokenPool with a larger max_context_len."
        )
    rows = pool.alloc(1)
    if rows is None:
        return False
    req.req_pool_idx = rows[0]
    match = cache.match_prefix_for_req(req)
    cache.inc_lock_ref(match.last_node)
    pool.write(req.req_pool_idx, 0, match.device_indices)
    req.cache_protected_len = req.kv_len = match.prefix_len
    return True


def _make_room(cache: RadixCache, num_tokens: int) -> bool:
    """Evict from the cache until ``num_tokens`` slots are free; ``False`` if impossible."""
    allocator = cache.token_to_kv_pool_allocator
    short = num_tokens - allocator.available_size()
    if short > 0:
        cache.evict(short)
    return allocator.available_size() >= num_tokens


def _last_locs(cache: RadixCache, reqs: Sequence[Req]) -> list[int]:
    """Slot of each request's last cached position (``-1`` if none), from the host copy of the table."""
    table = cache.req_to_token_pool.host
    return [int(table[r.req_pool_idx, r.kv_len - 1]) if r.kv_len else -1 for r in reqs]


def _commit(cache: RadixCache, reqs: Sequence[Req], lens: Sequence[int], out: torch.Tensor) -> None:
    cache.req_to_token_pool.write_many([r.req_pool_idx for r in reqs], [r.kv_len for r in reqs], lens, out)
    for req, n in zip(reqs, lens):
        req.kv_len += n


def alloc_for_extend(cache: RadixCache, reqs: Sequence[Req], extend_lens: Sequence[int]) -> torch.Tensor | None:
    """Slots for positions ``[kv_len, kv_len + extend_lens[i])`` of each request, concatenated.

    Writes them into the rows and advances ``kv_len``. A partially filled last page is
    continued before fresh pages are taken.
    """
    pool = cache.req_to_token_pool
    for req, n in zip(reqs, extend_lens, strict=True):
        if req.req_pool_idx is None:
            raise ValueError(f"request {req.rid!r} has no req_to_token row; call start_req() first.")
        if n < 0 or req.kv_len + n > min(len(req.all_ids), pool.max_context_len):
            raise ValueError(
                f"request {req.rid!r}: cannot extend kv_len={req.kv_len} by {n}; it has {len(req.all_ids)} tokens "
                f"and max_context_len={pool.max_context_len}."
            )
    prefix_lens = [r.kv_len for r in reqs]
    seq_lens = [r.kv_len + n for r, n in zip(reqs, extend_lens)]
    allocator = cache.token_to_kv_pool_allocator
    if not _make_room(cache, allocator.num_new_pages(prefix_lens, seq_lens) * allocator.page_size):
        return None
    out = allocator.alloc_extend(prefix_lens, seq_lens, _last_locs(cache, reqs))
    _commit(cache, reqs, extend_lens, out)
    return out


def alloc_for_decode(cache: RadixCache, reqs: Sequence[Req]) -> torch.Tensor | None:
    """One slot per request for the token at position ``kv_len`` (the last sampled one)."""
    max_len = cache.req_to_token_pool.max_context_len
    for req in reqs:
        if req.req_pool_idx is None or not 0 < req.kv_len < min(len(req.all_ids), max_len + 1):
            raise ValueError(
                f"request {req.rid!r} cannot decode: it needs a row and 0 < kv_len ({req.kv_len}) < #tokens "
                f"({len(req.all_ids)}) <= max_context_len ({max_len}); prefill it and append the sampled token "
                f"to output_ids first, and finish it before it outgrows its row."
            )
    allocator = cache.token_to_kv_pool_allocator
    seq_lens = [r.kv_len + 1 for r in reqs]
    if not _make_room(cache, allocator.num_new_pages([r.kv_len for r in reqs], seq_lens) * allocator.page_size):
        return None
    out = allocator.alloc_decode(seq_lens, _last_locs(cache, reqs))
    _commit(cache, reqs, [1] * len(reqs), out)
    return out
