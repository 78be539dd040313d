"""BasePrefixCache: what a scheduler needs from a prefix cache, whatever the data structure.

The scheduler (:mod:`hybridpar.radix.scheduler`), the admission policy
(:mod:`hybridpar.radix.schedule_policy`) and the allocation helpers
(:mod:`hybridpar.radix.allocation`) use a prefix cache only through these calls; the radix tree
(:class:`~hybridpar.radix.radix_cache.RadixCache`) is one implementation, and ``disable=True``
turns it into the no-reuse baseline. A match returns the KV slots of the longest cached prefix
and the node to lock so that the prefix survives eviction while a request uses it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hybridpar.core import Req


@dataclass
class MatchResult:
    """Result of :meth:`BasePrefixCache.match_prefix`.

    ``device_indices`` are the int64 slots of the matched prefix (length is a multiple of
    ``page_size``, possibly 0); ``last_node`` is the node where the match ends (the root
    for an empty match): lock it to keep the prefix from being evicted.
    """

    device_indices: torch.Tensor
    last_node: Any  # the implementation's node type

    @property
    def prefix_len(self) -> int:
        return len(self.device_indices)


class BasePrefixCache(ABC):
    """A prefix cache over a request-to-token pool and a KV allocator, in pages of ``page_size``."""

    page_size: int
    disable: bool

    @abstractmethod
    def match_prefix(self, key: Sequence[int] | torch.Tensor) -> MatchResult:
        """The longest cached prefix of ``key`` (whole pages); marks it recently used."""

    @abstractmethod
    def prefix_len(self, key: Sequence[int] | torch.Tensor) -> int:
        """How many tokens of ``key`` are cached, without side effects (for scheduling policies)."""

    @abstractmethod
    def match_prefix_for_req(self, req: Req) -> MatchResult:
        """:meth:`match_prefix` of a request's tokens, as admission uses it."""

    @abstractmethod
    def insert(self, key: Sequence[int] | torch.Tensor, value: torch.Tensor) -> int:
        """Cache ``value`` (slots) for ``key``; returns how many leading tokens were cached already."""

    @abstractmethod
    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` unlocked cached tokens if possible; returns how many were freed."""

    @abstractmethod
    def inc_lock_ref(self, node: Any) -> int:
        """Protect ``node`` and its ancestors from eviction (one more holder)."""

    @abstractmethod
    def dec_lock_ref(self, node: Any) -> int:
        """Drop one holder of ``node``'s lock."""

    @abstractmethod
    def evictable_size(self) -> int:
        """Cached tokens that eviction could free now."""

    @abstractmethod
    def protected_size(self) -> int:
        """Cached tokens locked by running requests."""

    @abstractmethod
    def cache_finished_req(self, req: Req) -> None:
        """A request is done (or preempted): its KV goes to the cache, its row and lock are released."""

    @abstractmethod
    def cache_unfinished_req(self, req: Req) -> None:
        """A request keeps running: cache what it has computed so far so that others can share it."""
