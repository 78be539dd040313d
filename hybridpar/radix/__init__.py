"""RadixAttention's data structures (chapter 5): memory pools, the radix tree, request hooks.

Pure bookkeeping: no torch.distributed, no model. Under tensor parallelism every rank
builds the same structures; only the KV buffers differ (each holds its own KV heads).

* :mod:`~hybridpar.radix.mem_pool`: :class:`ReqToTokenPool`, :class:`TokenToKVPoolAllocator`
  (paged free list), :class:`MHATokenToKVPool` (per-layer K/V) and byte accounting.
* :mod:`~hybridpar.radix.radix_cache`: :class:`RadixCache` (match, insert, split, LRU
  eviction, locks, request hooks).
* :mod:`~hybridpar.radix.request`: :class:`Req`, the state the hooks need.
* :mod:`~hybridpar.radix.allocation`: :func:`start_req`, :func:`alloc_for_extend`,
  :func:`alloc_for_decode`.
* :mod:`~hybridpar.radix.integrity`: :func:`check_integrity` and :class:`IntegrityError`.
"""

from hybridpar.radix.allocation import alloc_for_decode, alloc_for_extend, start_req
from hybridpar.radix.integrity import IntegrityError, check_integrity
from hybridpar.radix.mem_pool import (
    MHATokenToKVPool,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    kv_bytes_per_token,
    max_tokens_for_budget,
)
from hybridpar.radix.prefix_cache import BasePrefixCache, MatchResult
from hybridpar.radix.radix_cache import RadixCache, TreeNode
from hybridpar.core import Req

__all__ = [
    "BasePrefixCache",
    "IntegrityError",
    "MHATokenToKVPool",
    "MatchResult",
    "RadixCache",
    "Req",
    "ReqToTokenPool",
    "TokenToKVPoolAllocator",
    "TreeNode",
    "alloc_for_decode",
    "alloc_for_extend",
    "check_integrity",
    "kv_bytes_per_token",
    "max_tokens_for_budget",
    "start_req",
]
