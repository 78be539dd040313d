"""RadixCache: a radix tree from token sequences to the KV-cache slots that hold them (SGLang).

Each edge of the tree carries a run of tokens (``node.key``, a
:class:`~hybridpar.radix.radix_key.RadixKey` over a list of its own) and the slots of their KV
(``node.value``, int64 on the host, same length). The path from the root to a node spells a token
prefix; its KV is the concatenation of the values on that path, so requests that share a
prompt prefix share its KV instead of recomputing it.

Invariants (verified by :meth:`RadixCache.check_integrity`):

* Paging: every key has a length that is a multiple of ``page_size`` and every value is a
  run of whole pages, so matching, splitting and eviction never cut a page. Children are
  indexed by their first page of tokens.
* Ownership: the tree owns the slots in its values; each slot is owned by the tree, by
  one request, or is free, never two of these at once.
* Locks: ``lock_ref`` of a node counts the holders (requests or other users) whose locked
  node is this node or below it. Locked nodes (``lock_ref > 0``) are never evicted; their
  tokens are counted in ``protected_size``, the others in ``evictable_size``.
* LRU: every match or insert stamps the nodes it walks with the next value of a logical
  clock, so a parent is never older than its children; :meth:`evict` frees unlocked leaves
  oldest first (a :class:`~hybridpar.radix.tree_node.LeafHeap`). The clock is a counter, not wall
  time, so runs are reproducible. When a walk ends inside a node, SGLang stamps it *before*
  splitting it, so the unmatched lower half counts as just used too (``lru_split="both"``, the
  default); ``lru_split="upper"`` refreshes only the matched upper half (chapter 5's exercise).
* Host only: keys are Python lists, values int64 CPU tensors, and the request hooks read the
  host copy of ``req_to_token``; no tree operation touches the GPU, so none waits for it. The
  slots of a match go to the device only where :meth:`ReqToTokenPool.write` queues them.
* Cheap hooks: a request's locked prefix is, by the lock, the path to ``req.last_node``; the request
  hooks walk on from that node, stamping the path as a walk from the root would, without comparing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch

from hybridpar.radix.integrity import IntegrityError, check_integrity
from hybridpar.core import Req
from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.prefix_cache import BasePrefixCache, MatchResult
from hybridpar.radix.radix_key import RadixKey, prompt_key, req_key
from hybridpar.radix.tree_node import LeafHeap, TreeNode, lock, lock_down, stamp, unlock

LRU_SPLIT_RULES = ("both", "upper")
_NO_SLOTS = torch.empty(0, dtype=torch.int64)  # shared: an empty match or row made no tensor


class RadixCache(BasePrefixCache):
    """Prefix cache over a :class:`ReqToTokenPool` and a :class:`TokenToKVPoolAllocator`.

    ``page_size`` defaults to the allocator's and must equal it. With ``disable=True``
    the tree stays empty: matches return nothing and finished requests free all their
    slots (the baseline that RadixAttention is compared against). ``lru_split`` picks the LRU
    stamp of a node that a walk splits (module docstring).
    """

    def __init__(self, req_to_token_pool: ReqToTokenPool, token_to_kv_pool_allocator: TokenToKVPoolAllocator,
                 page_size: int | None = None, disable: bool = False, lru_split: Literal["both", "upper"] = "both") -> None:
        if lru_split not in LRU_SPLIT_RULES:
            raise ValueError(f"lru_split={lru_split!r}; choose one of {LRU_SPLIT_RULES}.")
        if page_size is not None and page_size != token_to_kv_pool_allocator.page_size:
            raise ValueError(
                f"page_size={page_size} differs from the allocator's page_size="
                f"{token_to_kv_pool_allocator.page_size}; build both with the same page_size."
            )
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool_allocator = token_to_kv_pool_allocator
        self.page_size = token_to_kv_pool_allocator.page_size
        self.device = torch.device("cpu")  # node values and match results stay on the host
        self.disable = disable
        self.lru_split = lru_split
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget the whole tree. Like SGLang's flush, the caller also clears both pools."""
        self._clock = 0
        self._next_id = 0
        self.root_node = self._new_node(RadixKey([]), _NO_SLOTS, None)
        self.root_node.lock_ref = 1  # the root is always protected and holds no tokens
        self._evictable_size = 0
        self._protected_size = 0
        self._lru = LeafHeap(lambda: (n for n in self.nodes() if not n.children and n.lock_ref == 0))

    @property
    def clock(self) -> int:
        """The logical LRU clock: the stamp of the newest match or insert."""
        return self._clock

    def evictable_size(self) -> int:
        return self._evictable_size

    def protected_size(self) -> int:
        return self._protected_size

    def total_size(self) -> int:
        """Tokens in the tree, counted by walking it (the counters are checked against this)."""
        return sum(len(n.key) for n in self.nodes())

    def nodes(self) -> Iterator[TreeNode]:
        """All nodes except the root, parents before children."""
        stack = list(self.root_node.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    # ---------------------------------------------------------------- helpers
    def _cat(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The slots of a path: one node's own tensor (not copied) or one ``torch.cat``."""
        if len(values) == 1:
            return values[0]
        return torch.cat(values) if values else _NO_SLOTS

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _new_node(self, key: RadixKey, value: torch.Tensor, parent: TreeNode | None, now: int = 0) -> TreeNode:
        node = TreeNode(self._next_id, key, value, parent, now)
        self._next_id += 1
        return node

    def child_key(self, key: RadixKey | Sequence[int]) -> Any:
        """Index of a child in its parent: its first token (page_size 1) or first page (a tuple)."""
        return RadixKey.of(key).page(self.page_size)

    def _aligned(self, n: int) -> int:
        return n // self.page_size * self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut ``child`` after ``n`` tokens; returns the new upper node (same lock and time).

        Both halves keep views of the same value tensor; each gets its own key list (see
        :mod:`~hybridpar.radix.radix_key`: whole keys make later matches cheaper).
        """
        upper = self._new_node(child.key[:n].whole(), child.value[:n], child.parent, child.last_access_time)
        upper.lock_ref = child.lock_ref
        child.parent.children[child.key.page(self.page_size)] = upper
        child.key, child.value, child.parent = child.key[n:].whole(), child.value[n:], upper
        upper.children[child.key.page(self.page_size)] = child
        return upper

    def _walk(self, key: RadixKey, node: TreeNode | None = None) -> tuple[TreeNode, list[torch.Tensor], int]:
        """Follow ``key`` (page aligned) from the root, splitting the node where it stops.

        Stamps every node on the path with a fresh clock value (under ``lru_split="both"`` the
        node where the walk stops is stamped before it is split, so its lower half is fresh too).
        Returns the last node, the values along the path, and the matched length. Given ``node``,
        the walk starts there, as if its path had been followed (stamped, not compared).
        """
        now = self._tick()
        ps, both = self.page_size, self.lru_split == "both"
        node, values, pos = node or self.root_node, [], 0
        stamp(node, now)
        tokens, start, end = key.token_ids, key.start, key.end
        while start + pos < end:
            rest = RadixKey(tokens, start + pos, end)
            child = node.children.get(rest.page(ps))
            if child is None:
                break
            n = child.key.match_len(rest, ps)
            if n < len(child.key):
                if both:
                    child.last_access_time = now
                self._lru.offer(child)  # what becomes the lower half: maybe a leaf with a new stamp
                child = self._split(child, n)
            child.last_access_time = now
            values.append(child.value)
            pos += n
            node = child
        self._lru.offer(node)
        return node, values, pos

    def path_to_root(self, node: TreeNode) -> list[TreeNode]:
        """``node`` and its ancestors, root excluded; raises if ``node`` left the tree."""
        path = []
        while node is not self.root_node:
            parent = node.parent
            if parent is None or parent.children.get(node.key.page(self.page_size)) is not node:
                raise IntegrityError(
                    f"{node} is not attached to this tree (evicted, or the cache was reset); match the prefix again."
                )
            path.append(node)
            node = parent
        return path

    # ------------------------------------------------------------- public API
    def match_prefix(self, key: Sequence[int] | torch.Tensor) -> MatchResult:
        """Longest cached prefix of ``key`` in whole pages (``len(key)`` is rounded down).

        May split a node so that ``last_node`` ends exactly at the match; refreshes the
        LRU time of the matched path. Never allocates or frees slots.
        """
        key = RadixKey.of(key)
        return self._match(key[: self._aligned(len(key))])

    def _match(self, key: RadixKey) -> MatchResult:
        if self.disable or not len(key):
            return MatchResult(_NO_SLOTS, self.root_node)
        node, values, _ = self._walk(key)
        return MatchResult(self._cat(values), node)

    def prefix_len(self, key: Sequence[int] | torch.Tensor) -> int:
        """Length of the longest cached prefix of ``key`` in whole pages, without side effects.

        What :meth:`match_prefix` would return the length of, for schedulers that only rank or
        filter requests (LPM, the in-batch filter): no split, no LRU stamp, no tensor work.
        """
        if self.disable:
            return 0
        key = RadixKey.of(key)
        key = key[: self._aligned(len(key))]
        node, pos, ps = self.root_node, 0, self.page_size
        while pos < len(key):
            rest = key[pos:]
            child = node.children.get(rest.page(ps))
            if child is None:
                break
            n = child.key.match_len(rest, ps)
            pos += n
            if n < len(child.key):
                break
            node = child
        return pos

    def match_prefix_for_req(self, req: Req) -> MatchResult:
        """Match for admission: at most ``len(all_ids) - 1`` tokens, page aligned.

        At least one token of every prompt is computed, so even a fully cached prompt
        produces the logits of its next token. Sets ``req.prefix_indices`` and
        ``req.last_node`` (not locked: lock before anything can evict).
        """
        key = prompt_key(req)
        result = self._match(key[: self._aligned(len(key))])
        req.prefix_indices, req.last_node = result.device_indices, result.last_node
        return result

    def insert(self, key: Sequence[int] | torch.Tensor, value: torch.Tensor) -> int:
        """Cache ``key`` with KV slots ``value``; returns the length that was already cached.

        ``len(key)`` must be a multiple of ``page_size``. The tree takes ownership of
        ``value[prefix_len:]``; the caller still owns ``value[:prefix_len]`` and must free
        those slots unless they are the tree's own (e.g. a locked, matched prefix).
        """
        if self.disable:
            raise RuntimeError("insert() on a disabled RadixCache; use cache_finished_req(), which frees the slots.")
        key = RadixKey.of(key)
        if len(key) % self.page_size or len(value) != len(key):
            raise ValueError(
                f"insert needs len(key) % page_size == 0 and len(value) == len(key), got {len(key)}, "
                f"{len(value)} with page_size={self.page_size}; truncate both to len(key) // page_size * page_size."
            )
        return self._insert(key, lambda lo, hi: value[lo:hi].to("cpu", torch.int64).clone())[2]

    def _insert(self, key: RadixKey, slots: Callable[[int, int], torch.Tensor],
                node: TreeNode | None = None) -> tuple[TreeNode, list[torch.Tensor], int]:
        """:meth:`insert`, walking from ``node`` (see :meth:`_walk`); ``slots(lo, hi)`` is the new leaf's
        own value for ``key[lo:hi]``. Returns the node that ends at ``len(key)``, the values of the walked
        path (the new leaf's excluded) and the length of ``key`` that was already cached."""
        node, values, prefix_len = self._walk(key, node)
        if prefix_len < len(key):
            # the new leaf comes after everything the walk stamped (a node split on the way stays a
            # tick older, as in SGLang, where the leaf is created after the walk's stamps)
            now = self._tick()
            tokens = key.token_ids[key.start + prefix_len:key.end]  # the leaf's own copy of its tokens
            leaf = self._new_node(RadixKey(tokens), slots(prefix_len, len(key)), node, now)
            stamp(node, now)
            node.children[leaf.key.page(self.page_size)] = leaf
            self._evictable_size += len(leaf.key)
            self._lru.offer(leaf)
            node = leaf
        return node, values, prefix_len

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` cached tokens, least recently used leaves first.

        Stops early when nothing unlocked is left. Returns the number of tokens freed
        (whole nodes, so possibly more than asked).
        """
        if self.disable or num_tokens <= 0:
            return 0
        evicted = 0
        while evicted < num_tokens:
            node = self._lru.pop()
            if node is None:
                break
            self.token_to_kv_pool_allocator.free(node.value)
            evicted += len(node.key)
            self._evictable_size -= len(node.key)
            parent, node.parent = node.parent, None  # detached: path_to_root and the heap refuse it now
            del parent.children[node.key.page(self.page_size)]
            self._lru.offer(parent)
        return evicted

    def inc_lock_ref(self, node: TreeNode) -> int:
        """Lock ``node`` and its ancestors; returns the change of ``evictable_size`` (<= 0)."""
        return 0 if self.disable else self._protect(lock(self.path_to_root(node)))

    def dec_lock_ref(self, node: TreeNode) -> int:
        """Release one lock taken by :meth:`inc_lock_ref`; returns the change of ``evictable_size`` (>= 0)."""
        return 0 if self.disable else self._release(self.path_to_root(node))

    def _release(self, path: list[TreeNode]) -> int:
        """Unlock ``path`` (a node's path to the root); its lowest node may become an evictable leaf."""
        delta = self._protect(unlock(path))
        if path:
            self._lru.offer(path[0])
        return delta

    def _protect(self, tokens: int) -> int:
        """Move ``tokens`` from the evictable to the protected counter; returns the evictable change."""
        self._evictable_size -= tokens
        self._protected_size += tokens
        return -tokens

    # ------------------------------------------------------------ request hooks
    def _row(self, req: Req, start: int = 0) -> np.ndarray:
        """The request's slots ``[start, kv_len)``, int64, from the host copy of its row (a fresh array)."""
        if req.req_pool_idx is None:
            raise ValueError(f"request {req.rid!r} has no req_to_token row; admit it with start_req() first.")
        if req.kv_len > len(req.origin_input_ids) + len(req.output_ids):
            raise ValueError(f"request {req.rid!r}: kv_len={req.kv_len} exceeds its {len(req.all_ids)} tokens.")
        return self.req_to_token_pool.read_numpy(req.req_pool_idx, req.kv_len, start)

    def _insert_req(self, req: Req, slots: np.ndarray) -> tuple[TreeNode, list[torch.Tensor], int, list[TreeNode]]:
        """Insert the page-aligned part of ``all_ids[:kv_len]``, walking on from the request's locked
        node; ``slots`` holds the row's positions ``[kv_len - len(slots), kv_len)`` (from
        ``cache_protected_len`` on, or more). Returns :meth:`_insert`'s three results (the length
        counted from the start of the request) and the path of the locked node, checked to be attached."""
        start, p = req.last_node or self.root_node, req.cache_protected_len
        path = self.path_to_root(start)
        if sum(len(n.key) for n in path) != p:
            raise IntegrityError(f"request {req.rid!r}: its locked prefix of {p} tokens left the tree.")
        aligned, at = self._aligned(req.kv_len), p - req.kv_len + len(slots)  # position p's index in slots
        node, values, cached = self._insert(req_key(req, aligned, p),
                                            lambda lo, hi: torch.from_numpy(slots[at + lo:at + hi].copy()), start)
        return node, values, p + cached, path

    def _free(self, slots: np.ndarray) -> None:
        if len(slots):
            self.token_to_kv_pool_allocator.free(torch.from_numpy(slots))

    def cache_finished_req(self, req: Req) -> None:
        """Hand a finished request's KV to the tree and release everything it holds.

        The page-aligned part of ``all_ids[:kv_len]`` is inserted; slots that duplicate
        tokens someone else cached meanwhile are freed, and so is the unaligned tail (its
        page belongs to this request alone). The lock and the req_to_token row are released.
        """
        p = req.cache_protected_len
        slots = self._row(req, p)  # positions [p, kv_len)
        if self.disable:
            self._free(slots)
        else:
            _, _, prefix_len, locked = self._insert_req(req, slots)
            self._free(slots[:prefix_len - p])
            self._free(slots[self._aligned(req.kv_len) - p:])
            self._release(locked)
        self.req_to_token_pool.free(req.req_pool_idx)
        req.req_pool_idx, req.last_node, req.cache_protected_len = None, None, 0
        req.prefix_indices = _NO_SLOTS

    def cache_unfinished_req(self, req: Req) -> None:
        """Cache the KV computed so far by a running request (after a chunked-prefill step).

        Inserts the page-aligned part of ``all_ids[:kv_len]``, frees duplicates and points the row
        at the tree's slots instead, marks the path used as a match of it would, moves the
        request's lock down to the new last node and sets ``prefix_indices`` to the whole row (the
        partial last page stays the request's own).
        """
        slots = self._row(req)
        if not self.disable:
            p, old = req.cache_protected_len, req.last_node
            node, values, prefix_len, _ = self._insert_req(req, slots)
            aligned = self._aligned(req.kv_len)
            if prefix_len > p:
                self._free(slots[p:prefix_len])
                tree_slots = self._cat(values)
                self.req_to_token_pool.write(req.req_pool_idx, p, tree_slots)
                slots[p:prefix_len] = tree_slots.numpy()
            if aligned:
                stamp(node, self._tick())
            self._protect(lock_down(old or self.root_node, node))
            req.last_node, req.cache_protected_len = node, aligned
        req.prefix_indices = torch.from_numpy(slots)

    def check_integrity(self, reqs: Sequence[Req] | None = None, locked_nodes: Sequence[TreeNode] = ()) -> None:
        """Raise :class:`IntegrityError` unless tree, counters, pools and requests agree.

        Pass ``reqs`` = every request that holds a req_to_token row to make the check exact
        (lock counts, free + cached + in-use == pool size, no leaked rows); ``locked_nodes``
        lists the other holders of locks, one entry per :meth:`inc_lock_ref`.
        """
        check_integrity(self, reqs, locked_nodes)
