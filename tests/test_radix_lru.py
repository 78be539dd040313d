"""The LRU stamp of a node that a walk splits: SGLang's order (default) and the other rule (chapter 5's exercise)."""
from __future__ import annotations

import pytest
import torch

from hybridpar.radix import RadixCache, ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.radix_key import RadixKey


def _cache(**kwargs) -> RadixCache:
    return RadixCache(ReqToTokenPool(2, 16), TokenToKVPoolAllocator(32, 1), **kwargs)


def _put(cache: RadixCache, tokens: list[int]) -> None:
    cache.insert(tokens, cache.token_to_kv_pool_allocator.alloc(len(tokens)))


def _left_after(lru_split: str) -> list[list[int]]:
    cache = _cache(lru_split=lru_split)
    _put(cache, [1, 2])
    _put(cache, [3])
    assert cache.match_prefix([1]).prefix_len == 1  # ends inside [1, 2]: splits it into [1] -> [2]
    assert cache.evict(1) == 1
    cache.check_integrity([])
    paths, stack = [], [(cache.root_node, [])]
    while stack:
        node, prefix = stack.pop()
        if not node.children and node is not cache.root_node:
            paths.append(prefix + node.key.tolist())
        stack.extend((c, prefix + node.key.tolist()) for c in node.children.values())
    return sorted(paths)


def test_sglang_order_stamps_the_split_node_so_its_lower_half_counts_as_used() -> None:
    assert _left_after("both") == [[1, 2]]  # [3] was the least recently used


def test_upper_rule_refreshes_only_the_matched_half() -> None:
    assert _left_after("upper") == [[1], [3]]  # [2] kept the stamp of the first insert


def test_default_is_sglang_and_a_bad_rule_is_refused() -> None:
    assert _cache().lru_split == "both"
    with pytest.raises(ValueError, match="lru_split='lru'"):
        _cache(lru_split="lru")


def test_radix_key_views_share_the_token_list() -> None:
    tokens = [5, 6, 7, 8, 9, 10]
    key = RadixKey.of(tokens)
    lower = key[2:]
    assert lower.token_ids is tokens and lower == (7, 8, 9, 10) and lower[1:3] == [8, 9]
    assert lower.page(2) == (7, 8) and key.page(1) == 5
    assert key.match_len(RadixKey([5, 6, 7, 0, 9, 10]), 2) == 2 and key.match_len(lower, 1) == 0
    assert (1,) + lower[:1] == (1, 7) and RadixKey.of(torch.tensor([3, 4])) == [3, 4]
