"""TreeNode: one edge of the radix tree, and the changes that run along a node's path to the root.

A node's *path* (the node and its ancestors, the root excluded) spells the tokens a match of it
walks. An LRU stamp refreshes the whole path, so a parent is never older than its children, and a
lock counts for the whole path, so ``lock_ref`` of a node is the number of holders at or below it.
The lock helpers return how many tokens turned from evictable to protected (negative: the other
way), so that :class:`~hybridpar.radix.radix_cache.RadixCache` keeps its two counters exact.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from typing import Any

import torch

from hybridpar.radix.integrity import IntegrityError
from hybridpar.radix.radix_key import RadixKey


class TreeNode:
    """One edge of the radix tree: ``key`` tokens whose KV lives in slots ``value``."""

    __slots__ = ("id", "key", "value", "parent", "children", "lock_ref", "last_access_time")

    def __init__(self, node_id: int, key: RadixKey, value: torch.Tensor, parent: TreeNode | None, now: int):
        self.id = node_id
        self.key = key
        self.value = value
        self.parent = parent
        self.children: dict[Any, TreeNode] = {}
        self.lock_ref = 0
        self.last_access_time = now

    def __lt__(self, other: TreeNode) -> bool:  # heap order for eviction: oldest first, ties by id
        return (self.last_access_time, self.id) < (other.last_access_time, other.id)

    def __repr__(self) -> str:
        return f"TreeNode(id={self.id}, len={len(self.key)}, lock_ref={self.lock_ref}, t={self.last_access_time})"


def stamp(node: TreeNode, now: int) -> None:
    """Set the LRU stamp of ``node`` and of all its ancestors, the root included."""
    while node is not None:
        node.last_access_time = now
        node = node.parent


def lock(path: list[TreeNode]) -> int:
    """One more holder on every node of ``path``; returns the tokens that became protected."""
    protected = 0
    for n in path:
        if n.lock_ref == 0:
            protected += len(n.key)
        n.lock_ref += 1
    return protected


def unlock(path: list[TreeNode]) -> int:
    """One holder less on every node of ``path``; returns minus the tokens that became evictable."""
    for n in path:
        if n.lock_ref < 1:
            raise IntegrityError(f"dec_lock_ref would make lock_ref negative at {n}; every dec needs a matching inc.")
    protected = 0
    for n in path:
        n.lock_ref -= 1
        if n.lock_ref == 0:
            protected -= len(n.key)
    return protected


def lock_down(old: TreeNode, new: TreeNode) -> int:
    """Move a holder from ``old`` to its descendant ``new`` (lock ``new``, unlock ``old``): only the nodes
    from ``new`` up to ``old``, ``old`` excluded, change. Returns the tokens that became protected."""
    protected = 0
    while new is not old:
        if new.lock_ref == 0:
            protected += len(new.key)
        new.lock_ref += 1
        new = new.parent
    return protected


class LeafHeap:
    """The evictable leaves (unlocked, childless, attached) in LRU order, kept between evictions.

    A heap of ``(stamp, id, node)`` entries, compared in C. Entries are never updated in place:
    whoever may have made a node an evictable leaf, or changed the stamp of one, :meth:`offer`\\ s it
    again, and :meth:`pop` drops the entries that no longer hold (the node got a child, a lock,
    a newer stamp, or left the tree). So an eviction costs a few heap operations, not a scan of the
    tree, and pops the same leaf a scan would. ``rebuild`` scans once when stale entries pile up.
    """

    def __init__(self, rebuild: Callable[[], Iterable[TreeNode]]) -> None:
        self._leaves = rebuild
        self._entries: list[tuple[int, int, TreeNode]] = []
        self._limit = 256

    def offer(self, node: TreeNode) -> None:
        if node.parent is not None and not node.children and node.lock_ref == 0:
            heapq.heappush(self._entries, (node.last_access_time, node.id, node))
            if len(self._entries) > self._limit:
                self._entries = [(n.last_access_time, n.id, n) for n in self._leaves()]
                heapq.heapify(self._entries)
                self._limit = 4 * len(self._entries) + 256

    def pop(self) -> TreeNode | None:
        """The least recently used evictable leaf (oldest stamp, then lowest id), or None."""
        while self._entries:
            stamp, _, node = heapq.heappop(self._entries)
            if node.parent is not None and not node.children and node.lock_ref == 0 and node.last_access_time == stamp:
                return node
        return None
