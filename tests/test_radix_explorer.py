"""The radix-tree explorer: its frames are the real cache's state, and its drawings say what the frames say."""
from __future__ import annotations

import copy
import re

import pytest

from hybridpar.viz.radix_explorer import (
    DEFAULT_SCRIPT,
    OP_KINDS,
    CacheOp,
    RadixSandbox,
    cache_html,
    evict,
    frame_html,
    insert,
    layout_tree,
    lock,
    match,
    pool_svg,
    radix_explorer,
    radix_playground,
    text_tokens,
    trace,
    tree_svg,
    unlock,
)


def _eviction_order(box: RadixSandbox) -> list[int]:
    """Node ids in the order the cache itself frees them, one page at a time (on a copy)."""
    cache = copy.deepcopy(box).cache
    start, order = len(cache.evicted_ids), []
    while cache.evict(box.page_size):
        order = cache.evicted_ids[start:]
    return order


def test_every_frame_is_the_cache_state_after_its_step():
    box = RadixSandbox()  # stepped alongside trace(): the frames must match what its cache reports
    frames = trace(DEFAULT_SCRIPT)
    assert len(frames) == len(DEFAULT_SCRIPT) + 1
    for frame, op in zip(frames[1:], DEFAULT_SCRIPT):
        box.apply(op)
        cache, alloc, ps = box.cache, box.allocator, box.page_size
        nodes = {n.id: n for n in cache.nodes()}
        drawn = {d["id"]: d for d in _all_nodes(frame.tree)}
        assert drawn.keys() == nodes.keys(), frame.label
        for node_id, node in nodes.items():
            assert drawn[node_id]["num_tokens"] == len(node.key)
            assert drawn[node_id]["lock_ref"] == node.lock_ref
            assert drawn[node_id]["last_access_time"] == node.last_access_time
        # counters and pool occupancy
        assert frame.free_tokens == alloc.available_size()
        assert frame.evictable_tokens == cache.evictable_size()
        assert frame.protected_tokens == cache.protected_size()
        owners = {o: sum(p.owner == o for p in frame.pages) for o in ("free", "tree", "request")}
        assert len(frame.pages) == alloc.num_pages
        assert owners["free"] * ps == alloc.available_size()
        assert sorted(p.page for p in frame.pages if p.owner == "free") == sorted(alloc.free_page_ids())
        assert owners["tree"] * ps == cache.total_size() == cache.evictable_size() + cache.protected_size()
        own = sum(-(-(r.kv_len - r.cache_protected_len) // ps) for r in box.running.values())
        assert owners["request"] == own and frame.request_tokens == own * ps
        for page in frame.pages:
            if page.owner == "tree":
                node = nodes[page.node_id]
                assert page.page in {s // ps for s in node.value.tolist()}
                assert page.locked == (node.lock_ref > 0)
        # LRU order: the evictable leaves in the order the cache's own evict() frees them
        assert frame.lru_order == [i for i in _eviction_order(box) if i in frame.lru_order]
        assert set(frame.lru_order) == {i for i, n in nodes.items() if not n.children and n.lock_ref == 0}
        assert frame.running == {name: r.last_node.id for name, r in box.running.items()}


def _all_nodes(tree: dict) -> list[dict]:
    out, stack = [], list(tree["root"]["children"])
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(node["children"])
    return out


def test_the_default_script_shows_split_shared_locks_and_eviction():
    frames = trace(DEFAULT_SCRIPT)
    assert {op.kind for op in DEFAULT_SCRIPT} == set(OP_KINDS)
    assert any("split" in f.highlight.values() for f in frames)
    shared_lock = any(n["lock_ref"] >= 2 for f in frames for n in _all_nodes(f.tree))
    assert shared_lock, "a prefix locked by two running requests"
    evicting_inserts = [f for f, op in zip(frames[1:], DEFAULT_SCRIPT) if op.kind == "insert" and f.evicted]
    assert evicting_inserts and "to make room" in evicting_inserts[0].result
    hit = next(f for f, op in zip(frames[1:], DEFAULT_SCRIPT) if op.kind == "match")
    assert "16 of" in hit.result  # a 16-token, page-aligned hit
    assert frames[-1].running == {} and frames[-1].protected_tokens == 0


def test_a_request_that_cannot_fit_changes_nothing():
    box = RadixSandbox(pool_tokens=32, page_size=4)
    box.apply(lock("a", "x" * 30))  # 8 pages: the whole pool, locked or owned by the running request
    before = box.snapshot()
    assert box.apply(insert("y" * 12)).startswith("not inserted")
    after = box.snapshot()
    shape = [(n["id"], n["num_tokens"], n["lock_ref"]) for n in _all_nodes(before.tree)]  # the match ticked the clock
    assert shape == [(n["id"], n["num_tokens"], n["lock_ref"]) for n in _all_nodes(after.tree)]
    assert (after.free_tokens, after.pages, after.running) == (before.free_tokens, before.pages, before.running)
    assert box.rows.available_size() == box.rows.size - 1
    box.check()
    assert "nothing to evict" in box.apply(evict(4))


def test_bad_operations_raise_before_changing_anything():
    box = RadixSandbox(pool_tokens=32, page_size=4)
    with pytest.raises(ValueError, match="unknown operation"):
        box.apply(CacheOp("delete", text="x"))
    with pytest.raises(ValueError, match="no running request 'r9'"):
        box.apply(unlock("r9"))
    with pytest.raises(ValueError, match="larger pool_tokens"):
        box.apply(insert("z" * 33))
    with pytest.raises(ValueError, match="empty"):
        box.apply(match(""))
    with pytest.raises(ValueError, match=">= 1"):
        box.apply(evict(0))
    box.apply(lock("r1", "abcdefgh"))
    with pytest.raises(ValueError, match="already running"):
        box.apply(lock("r1", "abcdefgh"))
    with pytest.raises(ValueError, match="unknown operation"):
        trace([CacheOp("flush")])
    box.check()


def test_any_cache_can_be_drawn_with_its_running_requests():
    from hybridpar.radix import RadixCache, Req, ReqToTokenPool, TokenToKVPoolAllocator, alloc_for_extend, start_req

    cache = RadixCache(ReqToTokenPool(2, 32), TokenToKVPoolAllocator(32, 4))
    req = Req("b", text_tokens("abcdefghij"))
    start_req(cache, req)
    alloc_for_extend(cache, [req], [10])
    page = cache_html(cache, {"b": req}, label="one running request")
    assert page.count('data-owner="request"') == 3 and page.count('data-owner="free"') == 5
    assert "one running request" in page and "step" not in page.split("</b>")[0]
    assert f"b at #{cache.root_node.id}" in page and "free 20" in page


def test_text_is_one_token_per_byte():
    assert text_tokens("Hé") == [72, 0xC3, 0xA9]


def test_drawings_show_the_frame():
    frames = trace(DEFAULT_SCRIPT)
    for frame in frames:
        svg = tree_svg(frame)
        nodes = _all_nodes(frame.tree)
        assert svg.count('class="radix-node"') == len(nodes) + 1  # and the root
        for n in nodes:
            assert f"{n['num_tokens']} tok · lock {n['lock_ref']}" in svg
        for rank, node_id in enumerate(frame.lru_order):
            assert re.search(rf"#{node_id} .*?evict {rank + 1}(st|nd|rd|th)", svg)
        pool = pool_svg(frame)
        for owner in ("free", "tree", "request"):
            assert pool.count(f'data-owner="{owner}"') == sum(p.owner == owner for p in frame.pages)
        page = frame_html(frame, len(frames) - 1)
        assert f"step {frame.step} of {len(frames) - 1}" in page and f"free {frame.free_tokens}" in page
    boxes, edges, width, _ = layout_tree(frames[6].tree)
    assert len(edges) == len(boxes) - 1
    for depth in {b.depth for b in boxes}:  # boxes on one level never overlap and stay inside the drawing
        xs = sorted(b.x for b in boxes if b.depth == depth)
        assert all(b - a >= 128 for a, b in zip(xs, xs[1:])) and xs[0] >= 0 and xs[-1] + 128 <= width


def test_explorer_links_a_slider_to_one_frame_per_step(monkeypatch):
    import ipywidgets as widgets

    pairs = set()
    real_jslink = widgets.jslink

    def recording_jslink(source, target):
        pairs.add((source[0].model_id, source[1], target[0].model_id, target[1]))
        return real_jslink(source, target)

    monkeypatch.setattr(widgets, "jslink", recording_jslink)
    view = radix_explorer()
    slider, stack = view.children
    assert isinstance(stack, widgets.Stack) and len(stack.children) == len(DEFAULT_SCRIPT) + 1
    assert isinstance(slider, widgets.IntSlider) and (slider.min, slider.max) == (0, len(DEFAULT_SCRIPT))
    assert pairs == {(slider.model_id, "value", stack.model_id, "selected_index")}
    for k, frame in enumerate(stack.children):
        assert f"step {k} of {len(DEFAULT_SCRIPT)}" in frame.value
    assert "evict" in stack.children[7].value


def test_playground_runs_operations_in_callbacks():
    view = radix_playground(pool_tokens=32, page_size=4)
    inputs, buttons_box, out = view.children
    text_w, name_w, tokens_w = inputs.children
    buttons = {b.description: b for b in buttons_box.children}
    assert set(buttons) == {*OP_KINDS, "reset"}
    text_w.value = "abcdefgh-1"
    buttons["insert"].click()
    assert "8 tok · lock 0" in out.value and "history: insert" in out.value
    name_w.value = "r1"
    text_w.value = "abcdefgh-2"
    buttons["lock"].click()
    assert "lock 1" in out.value and "r1 at #" in out.value
    buttons["lock"].click()  # r1 is already running: an error, nothing changes
    assert "Not possible" in out.value
    buttons["unlock"].click()
    tokens_w.value = 100
    buttons["evict"].click()
    assert "free 32" in out.value
    buttons["reset"].click()
    assert "empty cache" in out.value and "history" not in out.value
