"""hybridpar.radix: RadixCache (match, insert, split, LRU eviction, locks, hooks) and the integrity check."""

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from hybridpar.radix import (
    IntegrityError,
    RadixCache,
    Req,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
    alloc_for_decode,
    alloc_for_extend,
    start_req,
)
from hybridpar.radix.tree_view import pretty_print, tree_to_dict


def make_cache(page_size: int = 1, num_pages: int = 32, rows: int = 4, ctx: int = 64, disable: bool = False) -> RadixCache:
    allocator = TokenToKVPoolAllocator(size=num_pages * page_size, page_size=page_size)
    return RadixCache(ReqToTokenPool(rows, ctx), allocator, page_size=page_size, disable=disable)


def put(cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    """Cache ``tokens`` with fresh slots the way the hooks do: duplicates go back to the pool."""
    slots = cache.token_to_kv_pool_allocator.alloc(len(tokens))
    prefix_len = cache.insert(tokens, slots)
    cache.token_to_kv_pool_allocator.free(slots[:prefix_len])
    return slots


def run_req(cache: RadixCache, prompt: list[int], outputs: list[int] = ()) -> Req:
    """Admit, prefill in one chunk, decode ``outputs`` (the last one sampled, never fed back)."""
    req = Req(rid=len(prompt), origin_input_ids=list(prompt))
    assert start_req(cache, req)
    assert alloc_for_extend(cache, [req], [len(prompt) - req.kv_len]) is not None
    for i, tok in enumerate(outputs):
        req.output_ids.append(tok)
        if i < len(outputs) - 1:
            assert alloc_for_decode(cache, [req]) is not None
    return req


# ------------------------------------------------------------------ unit tests
def test_insert_splits_and_match_returns_the_stored_slots():
    cache = make_cache()
    s1 = put(cache, [1, 2, 3, 4])
    s2 = cache.token_to_kv_pool_allocator.alloc(4)
    assert cache.insert([1, 2, 5, 6], s2) == 2  # (1 2) was already cached: s2[:2] stays the caller's
    cache.token_to_kv_pool_allocator.free(s2[:2])
    root = cache.root_node
    (shared,) = root.children.values()
    assert shared.key == (1, 2) and sorted(c.key for c in shared.children.values()) == [(3, 4), (5, 6)]
    assert cache.total_size() == 6 and cache.evictable_size() == 6 and cache.protected_size() == 0

    m = cache.match_prefix([1, 2, 3, 9])  # stops inside node (3, 4): split it
    assert m.prefix_len == 3 and m.device_indices.tolist() == s1[:3].tolist()
    assert m.last_node.key == (3,) and list(m.last_node.children.values())[0].key == (4,)
    assert cache.match_prefix([1, 2, 3, 4]).device_indices.tolist() == s1.tolist()
    assert cache.match_prefix([1, 2, 5, 6]).device_indices.tolist() == s1[:2].tolist() + s2[2:].tolist()
    assert cache.match_prefix([7]).prefix_len == 0 and cache.match_prefix([7]).last_node is root
    assert cache.total_size() == 6


def test_page_alignment():
    cache = make_cache(page_size=4)
    with pytest.raises(ValueError, match="multiple of page_size|len\\(key\\) % page_size"):
        cache.insert([1, 2, 3], torch.tensor([4, 5, 6]))
    s = put(cache, list(range(8)))
    assert cache.match_prefix(list(range(7))).prefix_len == 4  # 7 tokens -> one whole page
    assert cache.match_prefix([0, 1, 2, 3, 4, 5, 6, 9]).prefix_len == 4  # a page that differs anywhere is a miss
    assert cache.match_prefix([0, 1, 2]).prefix_len == 0
    put(cache, [0, 1, 2, 3, 4, 5, 9, 9])  # diverges inside page 2: split at the page boundary, not at 6
    (top,) = cache.root_node.children.values()
    assert top.key == (0, 1, 2, 3) and top.value.tolist() == s[:4].tolist()
    assert sorted(top.children) == [(4, 5, 6, 7), (4, 5, 9, 9)]
    cache.check_integrity()


def test_lru_evicts_least_recently_used_leaf_first():
    cache = make_cache()
    for t in (1, 2, 3):
        put(cache, [t, t])
    cache.match_prefix([1, 1])  # touch A: B is now the oldest
    assert cache.evict(1) == 2  # whole nodes: asked 1, freed 2
    assert [cache.match_prefix([t, t]).prefix_len for t in (1, 2, 3)] == [2, 0, 2]  # touches (1 1), then (3 3)
    cache.evict(1)
    assert cache.match_prefix([1, 1]).prefix_len == 0 and cache.match_prefix([3, 3]).prefix_len == 2
    # a parent becomes a leaf once its children are gone, and is evicted after them
    put(cache, [5, 5, 5])
    put(cache, [5, 5, 6])
    assert cache.evict(100) == 2 + 4 and cache.total_size() == 0
    assert cache.token_to_kv_pool_allocator.available_size() == 32
    cache.check_integrity(reqs=[])


def test_locks_prevent_eviction_and_report_deltas():
    cache = make_cache()
    put(cache, [1, 2, 3, 4])
    put(cache, [1, 2, 9, 9])
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    assert cache.inc_lock_ref(node) == -4  # (1 2) and (3 4) become protected
    assert cache.inc_lock_ref(node) == 0
    assert (cache.evictable_size(), cache.protected_size()) == (2, 4)
    assert cache.evict(100) == 2  # only (9 9) can go
    assert cache.match_prefix([1, 2, 3, 4]).prefix_len == 4
    cache.check_integrity(reqs=[], locked_nodes=[node, node])
    assert cache.dec_lock_ref(node) == 0
    assert cache.dec_lock_ref(node) == 4
    with pytest.raises(IntegrityError, match="negative"):
        cache.dec_lock_ref(node)
    assert cache.evict(100) == 4
    with pytest.raises(IntegrityError, match="not attached"):
        cache.inc_lock_ref(node)  # an evicted node cannot be locked


def test_finished_hook_frees_duplicates_and_the_unaligned_tail():
    ps = 4
    cache = make_cache(page_size=ps, num_pages=16)
    alloc = cache.token_to_kv_pool_allocator
    prompt = list(range(10))
    a, b = Req("a", prompt), Req("b", prompt)
    assert start_req(cache, a) and start_req(cache, b)  # both miss: nothing cached yet
    alloc_for_extend(cache, [a, b], [10, 10])
    assert alloc.available_size() == (16 - 6) * ps  # 3 pages each
    cache.check_integrity([a, b])
    a_row = cache.req_to_token_pool.req_to_token[a.req_pool_idx, :10].tolist()
    cache.cache_finished_req(a)
    assert alloc.available_size() == (16 - 5) * ps  # a's tail page (tokens 8, 9) freed
    assert cache.total_size() == 8 and a.req_pool_idx is None
    cache.cache_finished_req(b)  # b's 2 duplicate pages and its tail page freed
    assert alloc.available_size() == (16 - 2) * ps
    assert cache.match_prefix(prompt).device_indices.tolist() == a_row[:8]
    cache.check_integrity(reqs=[])


def test_chunked_prefill_shares_chunks_with_other_requests():
    ps = 4
    cache = make_cache(page_size=ps, num_pages=16)
    alloc = cache.token_to_kv_pool_allocator
    a = Req("a", list(range(14)))
    assert start_req(cache, a)
    alloc_for_extend(cache, [a], [6])
    cache.cache_unfinished_req(a)
    assert (a.cache_protected_len, a.kv_len, cache.protected_size()) == (4, 6, 4)
    row = cache.req_to_token_pool.req_to_token[a.req_pool_idx]
    assert a.prefix_indices.tolist() == row[:6].tolist()
    cache.check_integrity([a])

    b = Req("b", list(range(10)) + [99, 99])
    assert start_req(cache, b) and b.kv_len == 4  # shares a's first chunk
    alloc_for_extend(cache, [a, b], [6, 8])  # a continues its open page (positions 6, 7)
    assert row[6].item() == row[5].item() + 1
    cache.cache_unfinished_req(a)
    assert a.cache_protected_len == 12
    cache.check_integrity([a, b])
    alloc_for_extend(cache, [a], [2])
    a.output_ids.append(7)
    assert alloc_for_decode(cache, [a]) is not None and a.kv_len == 15
    a.output_ids.append(8)
    cache.cache_finished_req(b)  # b's positions 4..7 duplicate a's chunk: freed
    cache.check_integrity([a])
    cache.cache_finished_req(a)
    cache.check_integrity([])
    # a's first 12 tokens, plus b's own page (8 9 99 99) branching off after 8 shared tokens
    assert cache.protected_size() == 0 and cache.total_size() == 16
    assert cache.match_prefix(b.all_ids).prefix_len == 12
    assert cache.evict(cache.evictable_size()) == 16 and alloc.available_size() == alloc.size


def test_unfinished_hook_repoints_duplicate_chunks_at_the_tree():
    ps = 4
    cache = make_cache(page_size=ps, num_pages=16)
    alloc = cache.token_to_kv_pool_allocator
    a, b = Req("a", list(range(12))), Req("b", list(range(12)))
    assert start_req(cache, a) and start_req(cache, b)
    alloc_for_extend(cache, [a, b], [9, 9])  # both compute the same first chunk
    cache.cache_unfinished_req(a)
    free_before = alloc.available_size()
    cache.cache_unfinished_req(b)  # b's two full pages duplicate a's: freed, b's row now uses a's slots
    assert alloc.available_size() == free_before + 2 * ps
    rows = cache.req_to_token_pool.req_to_token
    assert rows[b.req_pool_idx, :8].tolist() == rows[a.req_pool_idx, :8].tolist()
    assert rows[b.req_pool_idx, 8] != rows[a.req_pool_idx, 8]  # the open page stays b's own
    assert a.last_node is b.last_node and a.last_node.lock_ref == 2
    cache.check_integrity([a, b])


def test_at_least_one_token_is_recomputed():
    for ps, prompt_len, expected in [(1, 8, 7), (4, 8, 4), (4, 9, 8), (1, 1, 0)]:
        cache = make_cache(page_size=ps)
        prompt = list(range(prompt_len))
        cache.cache_finished_req(run_req(cache, prompt, outputs=[100]))  # whole prompt now cached
        assert cache.match_prefix(prompt).prefix_len == prompt_len // ps * ps
        req = Req("again", prompt)
        assert start_req(cache, req)
        assert req.kv_len == req.cache_protected_len == expected, (ps, prompt_len)
        assert alloc_for_extend(cache, [req], [prompt_len - expected]) is not None  # >= 1 token computed
        cache.check_integrity([req])


def test_disabled_mode_caches_nothing_and_frees_everything():
    cache = make_cache(page_size=4, disable=True)
    alloc = cache.token_to_kv_pool_allocator
    for _ in range(2):
        req = run_req(cache, list(range(10)), outputs=[1, 2, 3])
        assert req.cache_protected_len == 0 and req.kv_len == 12
        cache.cache_unfinished_req(req)  # nothing to share
        assert req.prefix_indices.numel() == 12
        cache.check_integrity([req])
        cache.cache_finished_req(req)
        assert alloc.available_size() == alloc.size and cache.total_size() == 0
    m = cache.match_prefix(list(range(10)))
    assert m.prefix_len == 0 and m.last_node is cache.root_node
    assert cache.evict(10) == 0 and cache.inc_lock_ref(cache.root_node) == 0
    with pytest.raises(RuntimeError, match="disabled"):
        cache.insert([1], torch.tensor([4]))
    cache.check_integrity(reqs=[])


def test_reset_forgets_the_tree():
    cache = make_cache()
    put(cache, [1, 2, 3])
    node = cache.match_prefix([1, 2, 3]).last_node
    cache.reset()
    cache.token_to_kv_pool_allocator.clear()
    assert cache.total_size() == 0 and cache.match_prefix([1, 2, 3]).prefix_len == 0
    with pytest.raises(IntegrityError, match="not attached"):
        cache.inc_lock_ref(node)
    cache.check_integrity(reqs=[])


def test_page_size_must_match_the_allocator():
    with pytest.raises(ValueError, match="same page_size"):
        RadixCache(ReqToTokenPool(1, 8), TokenToKVPoolAllocator(16, page_size=4), page_size=1)


def test_to_dict_and_pretty_print(capsys):
    cache = make_cache()
    put(cache, [1, 2, 3])
    put(cache, [1, 2, 4])
    put(cache, [5])
    locked = cache.match_prefix([5]).last_node
    cache.inc_lock_ref(locked)
    d = tree_to_dict(cache)
    assert (d["page_size"], d["evictable_size"], d["protected_size"]) == (1, 4, 1)
    root = d["root"]
    assert root["num_tokens"] == 0 and [c["tokens"] for c in root["children"]] == [[1, 2], [5]]
    shared, five = root["children"]
    assert five["lock_ref"] == 1 and five["evict_rank"] is None
    leaves = {tuple(c["tokens"]): c for c in shared["children"]}
    assert leaves[(3,)]["evict_rank"] == 0 and leaves[(4,)]["evict_rank"] == 1  # (3) is older
    assert leaves[(3,)]["last_access_time"] < leaves[(4,)]["last_access_time"]
    text = pretty_print(cache)
    assert capsys.readouterr().out.strip() == text
    assert f"#{five['id']} [5] n=1 lock=1" in text and "evictable=4 protected=1" in text


# --------------------------------------------------------- planted corruptions
def corrupted_setup():
    cache = make_cache(page_size=2, num_pages=16)
    put(cache, [1, 2, 3, 4])
    put(cache, [1, 2, 7, 7])
    req = run_req(cache, [1, 2, 3, 4, 5], outputs=[6])
    return cache, req


@pytest.mark.parametrize(
    "plant, message",
    [
        (lambda c, r: setattr(c, "_evictable_size", c.evictable_size() + 2), "evictable_size counter"),
        (lambda c, r: c.token_to_kv_pool_allocator.alloc(2), "pages leaked"),
        (lambda c, r: c.token_to_kv_pool_allocator.free(r.last_node.value), "both free and cached"),
        (lambda c, r: setattr(c.match_prefix([1, 2, 7, 7]).last_node, "value", r.last_node.value.clone()), "cached twice"),
        (lambda c, r: setattr(c.match_prefix([1, 2, 7, 7]).last_node, "lock_ref", -1), "negative lock_ref"),
        (lambda c, r: c.inc_lock_ref(c.match_prefix([1, 2, 7, 7]).last_node), "holders at or below"),
        (lambda c, r: c.req_to_token_pool.req_to_token[r.req_pool_idx].__setitem__(0, 30), "tree's slots"),
        (lambda c, r: c.req_to_token_pool.req_to_token[r.req_pool_idx].__setitem__(4, 31), "offset"),
        (lambda c, r: c.req_to_token_pool.alloc(1), "held by no request"),
        (lambda c, r: setattr(r, "kv_len", 99), "kv_len"),
    ],
)
def test_integrity_check_catches_planted_corruption(plant, message):
    cache, req = corrupted_setup()
    cache.check_integrity([req])
    plant(cache, req)
    with pytest.raises(IntegrityError, match=message):
        cache.check_integrity([req])


# ------------------------------------------------- state machine vs. a reference
BASES = [[0, 1, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 0], [0, 1, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 1]]
sequences = st.builds(
    lambda base, n, suffix: BASES[base][:n] + suffix,
    st.integers(0, len(BASES) - 1),
    st.integers(0, 16),
    st.lists(st.integers(0, 1), max_size=2),
)
prompts = sequences.map(lambda s: s or [2])


class RadixCacheMachine(RuleBasedStateMachine):
    """Random request lifecycles, raw inserts, matches, locks and evictions.

    The reference trie ``self.ref`` maps every cached page-aligned prefix (a token tuple)
    to the slots of its last page. It is updated from the *request* side (what was
    inserted, with which slots) and must always equal the tree's content; evictions may
    only remove unlocked content.
    """

    PAGE_SIZE = 1
    NUM_PAGES = 24
    ROWS = 4
    CTX = 32

    @initialize()
    def setup(self):
        ps = self.PAGE_SIZE
        self.cache = make_cache(page_size=ps, num_pages=self.NUM_PAGES // ps, rows=self.ROWS, ctx=self.CTX)
        self.alloc = self.cache.token_to_kv_pool_allocator
        self.ref: dict[tuple[int, ...], list[int]] = {}
        self.active: list[Req] = []
        self.handles: list[tuple[object, tuple[int, ...]]] = []  # (locked node, its prefix)
        self.next_rid = 0

    # -- reference helpers
    def ref_longest(self, key) -> tuple[int, list[int]]:
        ps, n, slots = self.PAGE_SIZE, 0, []
        while n + ps <= len(key) and tuple(key[: n + ps]) in self.ref:
            n += ps
            slots += self.ref[tuple(key[:n])]
        return n, slots

    def ref_add(self, key, slots) -> None:
        ps = self.PAGE_SIZE
        for n in range(ps, len(key) - len(key) % ps + 1, ps):
            self.ref.setdefault(tuple(key[:n]), list(slots[n - ps : n]))

    def tree_content(self) -> dict[tuple[int, ...], list[int]]:
        ps, out, stack = self.PAGE_SIZE, {}, [(self.cache.root_node, ())]
        while stack:
            node, prefix = stack.pop()
            slots = node.value.tolist()
            for i in range(0, len(node.key), ps):
                out[prefix + node.key[: i + ps]] = slots[i : i + ps]
            stack.extend((c, prefix + node.key) for c in node.children.values())
        return out

    def locked_prefixes(self) -> list[tuple[int, ...]]:
        reqs = [tuple(r.all_ids[: r.cache_protected_len]) for r in self.active]
        return reqs + [p for _, p in self.handles]

    def sync_after_eviction(self) -> None:
        """Allocation may evict: the tree may lose unlocked content, never gain or change any."""
        content = self.tree_content()
        for key, slots in content.items():
            assert self.ref.get(key) == slots, f"tree holds {key} -> {slots}, reference {self.ref.get(key)}"
        for prefix in self.locked_prefixes():
            assert self.ref_longest(prefix)[0] == len(prefix)
            assert all(prefix[:n] in content for n in range(self.PAGE_SIZE, len(prefix) + 1, self.PAGE_SIZE)), "locked prefix evicted"
        self.ref = content

    def pick(self, data, items):
        return items[data.draw(st.integers(0, len(items) - 1))]

    def row(self, req: Req) -> list[int]:
        return self.cache.req_to_token_pool.req_to_token[req.req_pool_idx, : req.kv_len].tolist()

    # -- request lifecycle: one step of one request, checked against the reference
    def start_one(self, prompt) -> Req:
        req = Req(self.next_rid, prompt)
        self.next_rid += 1
        expected_len, expected_slots = self.ref_longest(prompt[: len(prompt) - 1])
        assert start_req(self.cache, req)
        assert req.kv_len == req.cache_protected_len == expected_len
        assert req.prefix_indices.tolist() == expected_slots == self.row(req)
        self.active.append(req)
        return req

    def extend_one(self, req: Req, data) -> bool:
        """Prefill a chunk; returns False on out-of-memory (then nothing changed)."""
        n = data.draw(st.integers(1, len(req.origin_input_ids) - req.kv_len))
        kv_before, row_before = req.kv_len, self.row(req)
        out = alloc_for_extend(self.cache, [req], [n])
        self.sync_after_eviction()
        if out is None:
            assert req.kv_len == kv_before and self.row(req) == row_before
            return False
        assert req.kv_len == kv_before + n and self.row(req)[kv_before:] == out.tolist()
        if req.kv_len == len(req.origin_input_ids):
            req.output_ids.append(data.draw(st.integers(0, 2)))  # "sample" the first output token
        return True

    def decode_one(self, req: Req, data) -> bool:
        out = alloc_for_decode(self.cache, [req])
        self.sync_after_eviction()
        if out is None:
            return False
        assert self.row(req)[-1] == out.item()
        req.output_ids.append(data.draw(st.integers(0, 2)))
        return True

    def cache_unfinished_one(self, req: Req) -> None:
        aligned = req.kv_len // self.PAGE_SIZE * self.PAGE_SIZE
        key = req.all_ids[:aligned]
        cached_len, cached_slots = self.ref_longest(key)
        own = self.row(req)[cached_len:aligned]
        self.cache.cache_unfinished_req(req)
        self.ref_add(key, cached_slots + own)
        assert req.cache_protected_len == aligned
        assert self.row(req)[:aligned] == self.ref_longest(key)[1]  # duplicates now point at the tree's slots
        assert req.prefix_indices.tolist() == self.row(req)

    def finish_one(self, req: Req) -> None:
        aligned = req.kv_len // self.PAGE_SIZE * self.PAGE_SIZE
        key = req.all_ids[:aligned]
        cached_len, cached_slots = self.ref_longest(key)
        self.ref_add(key, cached_slots + self.row(req)[cached_len:aligned])
        self.cache.cache_finished_req(req)
        self.active.remove(req)
        assert req.req_pool_idx is None and req.last_node is None

    def prefilling(self) -> list[Req]:
        return [r for r in self.active if r.kv_len < len(r.origin_input_ids)]

    def decoding(self) -> list[Req]:
        return [r for r in self.active if r.output_ids and len(r.all_ids) < self.CTX]

    # -- request rules: interleaved steps of several requests
    @precondition(lambda self: len(self.active) < self.ROWS)
    @rule(prompt=prompts)
    def start(self, prompt):
        self.start_one(prompt)

    @precondition(lambda self: self.prefilling())
    @rule(data=st.data())
    def extend(self, data):
        self.extend_one(self.pick(data, self.prefilling()), data)

    @precondition(lambda self: self.decoding())
    @rule(data=st.data())
    def decode(self, data):
        self.decode_one(self.pick(data, self.decoding()), data)

    @precondition(lambda self: any(r.kv_len and not r.output_ids for r in self.active))
    @rule(data=st.data())
    def cache_unfinished(self, data):
        self.cache_unfinished_one(self.pick(data, [r for r in self.active if r.kv_len and not r.output_ids]))

    @precondition(lambda self: self.active)
    @rule(data=st.data())
    def finish(self, data):
        self.finish_one(self.pick(data, self.active))

    @precondition(lambda self: len(self.active) < self.ROWS)
    @rule(prompt=prompts, data=st.data())
    def serve(self, prompt, data):
        """A whole request in one rule: chunked prefill, decode, finish (abort on out-of-memory)."""
        req = self.start_one(prompt)
        while req in self.active:
            if len(req.all_ids) >= self.CTX or data.draw(st.integers(0, 3)) == 0:
                self.finish_one(req)
            elif req.kv_len < len(req.origin_input_ids):
                if not self.extend_one(req, data):
                    self.finish_one(req)
                elif req in self.prefilling() and data.draw(st.booleans()):
                    self.cache_unfinished_one(req)
            elif not self.decode_one(req, data):
                self.finish_one(req)

    # -- raw tree operations
    @rule(seq=sequences)
    def insert(self, seq):
        key = seq[: len(seq) // self.PAGE_SIZE * self.PAGE_SIZE]
        if self.alloc.available_size() < len(key):
            self.cache.evict(len(key) - self.alloc.available_size())
            self.sync_after_eviction()
        slots = self.alloc.alloc(len(key))
        if slots is None:
            return
        expected = self.ref_longest(key)[0]
        assert self.cache.insert(key, slots) == expected
        self.alloc.free(slots[:expected])
        self.ref_add(key, slots.tolist())

    @rule(seq=sequences)
    def match(self, seq):
        m = self.cache.match_prefix(seq)
        n, slots = self.ref_longest(seq)
        assert m.prefix_len == n and m.device_indices.tolist() == slots
        assert sum(len(x.key) for x in self.cache.path_to_root(m.last_node)) == n

    @rule(seq=sequences)
    def lock(self, seq):
        m = self.cache.match_prefix(seq)
        path = self.cache.path_to_root(m.last_node)
        expected = -sum(len(x.key) for x in path if x.lock_ref == 0)
        assert self.cache.inc_lock_ref(m.last_node) == expected
        self.handles.append((m.last_node, tuple(seq[: m.prefix_len])))

    @precondition(lambda self: self.handles)
    @rule(data=st.data())
    def unlock(self, data):
        node, _ = handle = self.pick(data, self.handles)
        expected = sum(len(x.key) for x in self.cache.path_to_root(node) if x.lock_ref == 1)
        assert self.cache.dec_lock_ref(node) == expected
        self.handles.remove(handle)

    @rule(num_tokens=st.integers(0, 24))
    def evict(self, num_tokens):
        evictable = self.cache.evictable_size()
        before = {n.id: n.last_access_time for n in self.cache.nodes()}
        freed = self.cache.evict(num_tokens)
        assert (freed >= num_tokens) if num_tokens <= evictable else (freed == evictable)
        assert self.cache.evictable_size() == evictable - freed
        left = {n.id for n in self.cache.nodes()}
        gone = [t for i, t in before.items() if i not in left]
        candidates = [n.last_access_time for n in self.cache.nodes() if not n.children and n.lock_ref == 0]
        if gone and candidates:  # LRU: everything evicted is older than every leaf that stays
            assert max(gone) <= min(candidates)
        self.sync_after_eviction()

    # -- invariants and clean-up
    @invariant()
    def consistent(self):
        self.cache.check_integrity(self.active, [node for node, _ in self.handles])
        assert self.tree_content() == self.ref

    def teardown(self):
        if not hasattr(self, "cache"):
            return
        for req in list(self.active):
            self.cache.cache_finished_req(req)
        for node, _ in self.handles:
            self.cache.dec_lock_ref(node)
        self.cache.check_integrity(reqs=[])
        assert self.cache.protected_size() == 0
        self.cache.evict(self.cache.evictable_size())
        assert self.cache.total_size() == 0 and self.alloc.available_size() == self.alloc.size  # no slot leaked
        assert self.cache.req_to_token_pool.available_size() == self.ROWS
        self.cache.check_integrity(reqs=[])


class RadixCacheMachinePaged(RadixCacheMachine):
    PAGE_SIZE = 4


_settings = settings(max_examples=50, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TestRadixCacheMachinePageSize1 = RadixCacheMachine.TestCase
TestRadixCacheMachinePageSize1.settings = _settings
TestRadixCacheMachinePageSize4 = RadixCacheMachinePaged.TestCase
TestRadixCacheMachinePageSize4.settings = _settings
