"""A callable consistency check for a RadixCache, its two pools and the live requests.

It recomputes from scratch what the cache tracks incrementally and raises
:class:`IntegrityError` at the first disagreement, naming the node, page, request or
counter involved. It is meant to be called freely: from tests after every step, from a
scheduler in debug mode, from a notebook after an experiment.

Checked always:

* tree shape: parent pointers, child keys (first token/page), non-empty page-aligned keys,
  values of the same length made of whole allocatable pages, ancestors at least as
  recently used as descendants;
* counters: ``evictable_size`` and ``protected_size`` equal the sums over unlocked and
  locked nodes; lock counts are never negative and a node's lock count is at least the
  sum of its children's;
* ownership: no page is cached twice, free twice, or both cached and free.

Checked when the list of live requests is given:

* every allocated req_to_token row belongs to exactly one request;
* lock counts equal the number of holders at or below each node;
* a request's first ``cache_protected_len`` positions are exactly the slots of the tree
  path ending at its ``last_node`` and spell its first tokens;
* its own positions follow the paging rule (position ``pos`` at offset ``pos % page_size``)
  and its pages are owned by nobody else;
* free + cached + in-use pages == pool size (no page leaked).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridpar.radix.radix_cache import RadixCache, TreeNode
    from hybridpar.core import Req


class IntegrityError(AssertionError):
    """The cache, the pools and the requests disagree; the message says where."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise IntegrityError(message)


def _check_tree(cache: RadixCache) -> dict[int, str]:
    """Tree shape and counters; returns ``page -> owner`` for every cached page."""
    ps, num_pages, root = cache.page_size, cache.token_to_kv_pool_allocator.num_pages, cache.root_node
    _require(root.parent is None and root.key == () and len(root.value) == 0, "root must have no parent, key or value")
    _require(root.lock_ref == 1, f"root lock_ref must stay 1, found {root.lock_ref}")
    _require(not (cache.disable and root.children), "a disabled cache must keep its tree empty")
    owners: dict[int, str] = {}
    seen: set[int] = set()
    evictable = protected = 0
    stack = [root]
    while stack:
        parent = stack.pop()
        lock_sum = 0
        for ck, node in parent.children.items():
            where = f"node #{node.id} (child of #{parent.id})"
            _require(node.id not in seen, f"{where} is reachable twice")
            seen.add(node.id)
            _require(node.parent is parent, f"{where}: parent pointer is #{getattr(node.parent, 'id', None)}")
            n = len(node.key)
            _require(n > 0 and n % ps == 0, f"{where}: key length {n} is not a positive multiple of page_size={ps}")
            _require(ck == cache.child_key(node.key), f"{where}: indexed by {ck!r} but its key starts {node.key[:ps]!r}")
            _require(node.value.dim() == 1 and len(node.value) == n, f"{where}: {len(node.value)} slots for {n} tokens")
            _require(node.lock_ref >= 0, f"{where}: negative lock_ref {node.lock_ref}")
            _require(
                node.last_access_time <= parent.last_access_time,
                f"{where}: accessed at {node.last_access_time}, after its parent ({parent.last_access_time})",
            )
            slots = node.value.tolist()
            for i in range(0, n, ps):
                first = slots[i]
                _require(
                    first % ps == 0 and slots[i : i + ps] == list(range(first, first + ps)),
                    f"{where}: slots {slots[i:i + ps]} at offset {i} are not one whole page",
                )
                page = first // ps
                _require(1 <= page <= num_pages, f"{where}: page {page} is outside the allocatable pages 1..{num_pages}")
                _require(page not in owners, f"page {page} is cached twice: by {owners.get(page)} and {where}")
                owners[page] = where
            if node.lock_ref:
                protected += n
            else:
                evictable += n
            lock_sum += node.lock_ref
            stack.append(node)
        if parent is not root:
            _require(parent.lock_ref >= lock_sum, f"node #{parent.id}: lock_ref {parent.lock_ref} < children's sum {lock_sum}")
    _require(evictable == cache.evictable_size(), f"evictable_size counter {cache.evictable_size()} != {evictable} in the tree")
    _require(protected == cache.protected_size(), f"protected_size counter {cache.protected_size()} != {protected} in the tree")
    return owners


def _check_requests(cache: RadixCache, reqs: Sequence[Req], locked_nodes: Sequence[TreeNode], owners: dict[int, str]) -> int:
    """Rows, locks and per-request slots; adds request pages to ``owners``, returns their count."""
    ps, pool = cache.page_size, cache.req_to_token_pool
    rows = [r.req_pool_idx for r in reqs]
    _require(None not in rows, "check_integrity(reqs=...) takes only requests that hold a req_to_token row")
    _require(len(set(rows)) == len(rows), f"two requests share a req_to_token row: {rows}")
    used = {i for i in range(pool.size) if not pool.is_free(i)}
    _require(used == set(rows), f"req_to_token rows {sorted(used - set(rows))} are held by no request (leak); rows {sorted(set(rows) - used)} are free but in use")

    expected = Counter()
    for holder in [r.last_node for r in reqs if r.last_node is not None] + list(locked_nodes):
        for n in cache.path_to_root(holder):
            expected[n.id] += 1
    for node in cache.nodes():
        _require(node.lock_ref == expected[node.id], f"node #{node.id}: lock_ref {node.lock_ref} but {expected[node.id]} holders at or below it")

    req_pages = 0
    for req in reqs:
        who = f"request {req.rid!r}"
        p, kv = req.cache_protected_len, req.kv_len
        _require(0 <= p <= kv <= len(req.all_ids), f"{who}: need 0 <= cache_protected_len ({p}) <= kv_len ({kv}) <= #tokens ({len(req.all_ids)})")
        _require(p % ps == 0, f"{who}: cache_protected_len {p} is not a multiple of page_size={ps}")
        path = cache.path_to_root(req.last_node)[::-1] if req.last_node is not None else []
        tokens = [t for n in path for t in n.key]
        slots = [s for n in path for s in n.value.tolist()]
        _require(len(tokens) == p, f"{who}: locked path holds {len(tokens)} tokens, cache_protected_len is {p}")
        _require(tokens == req.all_ids[:p], f"{who}: locked path spells other tokens than the request's first {p}")
        row = pool.req_to_token[req.req_pool_idx, :kv].tolist()
        _require(row[:p] == slots, f"{who}: row positions [0, {p}) do not point at the tree's slots")
        for j in range(p, kv):
            _require(row[j] % ps == j % ps, f"{who}: position {j} sits at slot {row[j]}, offset {row[j] % ps} != {j % ps} in its page")
            if j % ps:
                _require(row[j] == row[j - 1] + 1, f"{who}: positions {j - 1} and {j} are not in one page")
                continue
            page = row[j] // ps
            _require(page not in owners, f"page {page} is owned by {owners.get(page)} and by {who} (position {j})")
            owners[page] = who
            req_pages += 1
    return req_pages


def check_integrity(cache: RadixCache, reqs: Sequence[Req] | None = None, locked_nodes: Sequence[TreeNode] = ()) -> None:
    """See the module docstring; :meth:`RadixCache.check_integrity` calls this."""
    alloc = cache.token_to_kv_pool_allocator
    owners = _check_tree(cache)
    cached = len(owners)
    free = alloc.free_page_ids()
    _require(len(set(free)) == len(free), "the free list holds a page twice")
    both = sorted(set(free) & owners.keys())
    _require(not both, f"pages {both[:8]} are both free and cached")
    if reqs is None:
        _require(cached + len(free) <= alloc.num_pages, f"cached ({cached}) + free ({len(free)}) pages exceed the pool ({alloc.num_pages})")
        return
    for page in free:
        owners[page] = "the free list"
    in_use = _check_requests(cache, reqs, locked_nodes, owners)
    total = cached + len(free) + in_use
    _require(
        total == alloc.num_pages,
        f"free ({len(free)}) + cached ({cached}) + in-use ({in_use}) = {total} pages, pool has {alloc.num_pages}: "
        f"{alloc.num_pages - total} pages leaked",
    )
