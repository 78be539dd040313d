"""The radix explorer's frames: a cache read into plain data (:func:`snapshot_cache`), and its drawing.

An :class:`ExplorerFrame` holds the tree (``tree_to_dict``), every page's owner and the counters;
the drawing functions (the tree as SVG boxes, the KV pool as a strip of pages, a frame's HTML) are
pure functions of it, so every state of the explorer can be drawn in advance for the static book.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hybridpar.core import Req
from hybridpar.radix.radix_cache import RadixCache
from hybridpar.radix.tree_view import tree_to_dict
from hybridpar.viz.colors import TEXT_COLOR

# Owner colours (pale, dark text stays readable): locked tree node, evictable leaf, unlocked inner
# node, a running request's own page, free page.
LOCKED_COLOR = "#ffbb78"
EVICTABLE_COLOR = "#aec7e8"
INNER_COLOR = "#dbdb8d"
REQUEST_COLOR = "#c5b0d5"
FREE_COLOR = "#f4f4f4"
HIGHLIGHT_COLORS = {"matched": "#2ca02c", "new": "#1f77b4", "split": "#9467bd"}


NODE_W, NODE_H, GAP_X, GAP_Y, MARGIN = 128, 56, 12, 30, 8


@dataclass(frozen=True)
class PageState:
    """One allocatable page: ``owner`` is ``"free"``, ``"tree"`` (node ``node_id``, ``locked`` or not)
    or ``"request"`` (the running request ``request``)."""

    page: int
    owner: str
    node_id: int | None = None
    locked: bool = False
    request: str | None = None


@dataclass(frozen=True)
class ExplorerFrame:
    """The cache after one step of a script.

    ``tree``: ``tree_to_dict(cache)``; ``pages``: every allocatable page in order; token counters
    as the cache and the allocator report them; ``lru_order``: unlocked leaves, next to be evicted
    first; ``highlight``: node id -> ``"matched"`` / ``"new"`` / ``"split"`` for this step;
    ``evicted``: ids of the nodes this step freed; ``running``: request name -> id of its locked node.
    """

    step: int
    label: str
    result: str
    page_size: int
    tree: dict[str, Any]
    pages: list[PageState]
    free_tokens: int
    evictable_tokens: int
    protected_tokens: int
    request_tokens: int
    lru_order: list[int]
    highlight: dict[int, str] = field(default_factory=dict)
    evicted: list[int] = field(default_factory=list)
    running: dict[str, int] = field(default_factory=dict)

    @property
    def pool_tokens(self) -> int:
        return len(self.pages) * self.page_size


def text_tokens(text: str) -> list[int]:
    """One token per UTF-8 byte (ids 0..255), as the built-in checkpoints' byte-level tokenizer."""
    return list(text.encode("utf-8"))


def tokens_text(tokens: Sequence[int]) -> str:
    """Inverse of :func:`text_tokens` for display (undecodable bytes become U+FFFD)."""
    return bytes(t for t in tokens if 0 <= t < 256).decode("utf-8", errors="replace")


@dataclass(frozen=True)
class NodeBox:
    """Where a node is drawn (top-left corner) and what it says."""

    id: int
    x: float
    y: float
    depth: int
    data: dict[str, Any]


def layout_tree(tree: dict[str, Any]) -> tuple[list[NodeBox], list[tuple[int, int]], float, float]:
    """Tidy layered layout: leaves side by side in key order, parents centred over their children.

    Returns the boxes (root first), the edges ``(parent id, child id)``, the width and the height.
    """
    boxes: list[NodeBox] = []
    edges: list[tuple[int, int]] = []
    next_x = [MARGIN]

    def place(node: dict[str, Any], depth: int) -> float:
        if node["children"]:
            centres = [place(c, depth + 1) for c in node["children"]]
            edges.extend((node["id"], c["id"]) for c in node["children"])
            centre = (centres[0] + centres[-1]) / 2
        else:
            centre = next_x[0] + NODE_W / 2
            next_x[0] += NODE_W + GAP_X
        boxes.append(NodeBox(node["id"], centre - NODE_W / 2, MARGIN + depth * (NODE_H + GAP_Y), depth, node))
        return centre

    place(tree["root"], 0)
    boxes.sort(key=lambda b: (b.depth, b.x))
    width = max(next_x[0] - GAP_X + MARGIN, NODE_W + 2 * MARGIN)
    height = MARGIN * 2 + (max(b.depth for b in boxes) + 1) * (NODE_H + GAP_Y) - GAP_Y
    return boxes, edges, width, height


def node_color(node: dict[str, Any]) -> str:
    if node["lock_ref"] > 0:
        return LOCKED_COLOR
    return EVICTABLE_COLOR if node["evict_rank"] is not None else INNER_COLOR


def _ordinal(n: int) -> str:
    return f"{n}{'tsnrhtdd'[(n // 10 % 10 != 1) * (n % 10 < 4) * n % 10::4]}"


def node_lines(node: dict[str, Any], is_root: bool = False, max_chars: int = 15) -> list[str]:
    """The three lines of text in a node's box: its tokens, count and lock, LRU time and eviction rank."""
    if is_root:
        return ["root", "always locked", f"clock {node['last_access_time']}"]
    text = tokens_text(node["tokens"]).replace("\n", "⏎")
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    if node["lock_ref"]:
        state = "locked"
    elif node["evict_rank"] is not None:
        state = f"evict {_ordinal(node['evict_rank'] + 1)}"
    else:
        state = "inner"
    return [f"#{node['id']} “{text}”", f"{node['num_tokens']} tok · lock {node['lock_ref']}",
            f"t={node['last_access_time']} · {state}"]


def tree_svg(frame: ExplorerFrame) -> str:
    """The tree of ``frame`` as an inline SVG (white background: readable in both themes)."""
    boxes, edges, width, height = layout_tree(frame.tree)
    at = {b.id: b for b in boxes}
    root_id = frame.tree["root"]["id"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
             f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11" role="img">',
             '<rect width="100%" height="100%" fill="white"/>']
    for parent, child in edges:
        p, c = at[parent], at[child]
        parts.append(f'<line x1="{p.x + NODE_W / 2:.1f}" y1="{p.y + NODE_H:.1f}" x2="{c.x + NODE_W / 2:.1f}" '
                     f'y2="{c.y:.1f}" stroke="#888" stroke-width="1.5"/>')
    for b in boxes:
        is_root = b.id == root_id
        fill = "#ffffff" if is_root else node_color(b.data)
        mark = frame.highlight.get(b.id)
        stroke, sw = (HIGHLIGHT_COLORS[mark], 3.5) if mark else ("#555", 1)
        title = "root" if is_root else html.escape(tokens_text(b.data["tokens"]))
        parts.append(f'<g class="radix-node" data-node="{b.id}"><title>{title}</title>'
                     f'<rect x="{b.x:.1f}" y="{b.y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="6" fill="{fill}" '
                     f'stroke="{stroke}" stroke-width="{sw}"/>')
        for i, line in enumerate(node_lines(b.data, is_root)):
            weight = ' font-weight="bold"' if i == 0 else ""
            parts.append(f'<text x="{b.x + 6:.1f}" y="{b.y + 16 + 15 * i:.1f}" fill="{TEXT_COLOR}"{weight}>'
                         f'{html.escape(line)}</text>')
        parts.append("</g>")
    parts.append("</svg>")
    return "".join(parts)


def page_color(page: PageState) -> str:
    if page.owner == "free":
        return FREE_COLOR
    if page.owner == "request":
        return REQUEST_COLOR
    return LOCKED_COLOR if page.locked else EVICTABLE_COLOR


def pool_svg(frame: ExplorerFrame, cell: int = 34) -> str:
    """The pool as a strip of pages: each cell is one page, labelled with its owner (node id or request)."""
    n = len(frame.pages)
    width, height = n * cell + 2 * MARGIN, cell + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
             f'{height}" font-family="sans-serif" font-size="10" role="img">',
             '<rect width="100%" height="100%" fill="white"/>']
    for i, page in enumerate(frame.pages):
        x = MARGIN + i * cell
        label = {"free": "", "tree": f"#{page.node_id}", "request": page.request or ""}[page.owner]
        parts.append(f'<rect class="pool-page" data-owner="{page.owner}" x="{x}" y="{MARGIN}" width="{cell - 2}" '
                     f'height="{cell - 2}" fill="{page_color(page)}" stroke="#999"/>'
                     f'<text x="{x + (cell - 2) / 2}" y="{MARGIN + cell / 2 + 1}" text-anchor="middle" '
                     f'fill="{TEXT_COLOR}">{html.escape(label)}</text>'
                     f'<text x="{x + (cell - 2) / 2}" y="{MARGIN + cell + 12}" text-anchor="middle" '
                     f'fill="#666" font-size="8">{page.page}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _swatch(color: str, text: str) -> str:
    return (f'<span style="display:inline-block;width:0.9em;height:0.9em;background:{color};border:1px solid #999;'
            f'vertical-align:middle;margin:0 0.3em 0 0.8em"></span>{html.escape(text)}')


def frame_html(frame: ExplorerFrame, total_steps: int | None = None) -> str:
    """One frame: the step and its result, the tree, the pool strip, the counters and the LRU order."""
    title = frame.label if total_steps is None and frame.step == 0 else \
        f"step {frame.step}{f' of {total_steps}' if total_steps is not None else ''}: {frame.label}"
    pages_in = {o: sum(p.owner == o for p in frame.pages) for o in ("free", "tree", "request")}
    lru = " → ".join(f"#{i}" for i in frame.lru_order) or "(nothing evictable)"
    running = ", ".join(f"{n} at #{i}" for n, i in frame.running.items()) or "none"
    legend = (_swatch(LOCKED_COLOR, "locked") + _swatch(EVICTABLE_COLOR, "evictable leaf")
              + _swatch(INNER_COLOR, "unlocked inner node") + _swatch(REQUEST_COLOR, "request's own page")
              + _swatch(FREE_COLOR, "free page"))
    marks = "".join(f'<span style="color:{c};font-weight:bold;margin-left:0.8em">▢ {k}</span>'
                    for k, c in HIGHLIGHT_COLORS.items())
    counters = (f"free {frame.free_tokens} · cached {frame.evictable_tokens + frame.protected_tokens} "
                f"(evictable {frame.evictable_tokens}, locked {frame.protected_tokens}) · requests' own "
                f"{frame.request_tokens} · pool {frame.pool_tokens} tokens "
                f"({pages_in['free']} free / {pages_in['tree']} cached / {pages_in['request']} request pages)")
    return (f'<div class="hybridpar-radix" style="color:{TEXT_COLOR};background:white;padding:0.4em;'
            f'border:1px solid #ddd;border-radius:4px">'
            f'<div><b>{html.escape(title)}</b></div>'
            f'<div style="margin-bottom:0.3em">{html.escape(frame.result)}</div>'
            f'<div style="overflow-x:auto">{tree_svg(frame)}</div>'
            f'<div style="font-size:0.85em">{legend}{marks}<br>t: last access on the cache\'s logical clock; '
            f'evict k-th: place in the LRU eviction order (unlocked leaves only)</div>'
            f'<div style="margin-top:0.3em"><b>KV pool</b> (page size {frame.page_size}; page 0 reserved)</div>'
            f'<div style="overflow-x:auto">{pool_svg(frame)}</div>'
            f'<div style="font-size:0.9em">{html.escape(counters)}<br>'
            f'LRU eviction order: {html.escape(lru)}<br>running requests: {html.escape(running)}</div></div>')


def snapshot_cache(cache: RadixCache, running: dict[str, Req] | None = None, step: int = 0, label: str = "",
                   result: str = "", highlight: dict[int, str] | None = None,
                   evicted: Sequence[int] = ()) -> ExplorerFrame:
    """Read any :class:`RadixCache`, its pools and the ``running`` requests (name -> request holding
    a row) into an :class:`ExplorerFrame`: every page's owner, the cache's counters, the LRU order."""
    running = running or {}
    ps, allocator, rows = cache.page_size, cache.token_to_kv_pool_allocator, cache.req_to_token_pool
    owner: dict[int, PageState] = {}
    for node in cache.nodes():
        for slot in node.value.tolist()[::ps]:
            owner[slot // ps] = PageState(slot // ps, "tree", node.id, node.lock_ref > 0)
    for name, req in running.items():
        row = rows.req_to_token[req.req_pool_idx, req.cache_protected_len:req.kv_len].tolist()
        for pos, slot in enumerate(row, start=req.cache_protected_len):
            if pos % ps == 0:
                owner[slot // ps] = PageState(slot // ps, "request", request=str(name))
    pages = [owner.get(p, PageState(p, "free")) for p in range(1, allocator.num_pages + 1)]
    tree = tree_to_dict(cache)
    lru = sorted((n["evict_rank"], n["id"]) for n in _walk(tree["root"]) if n["evict_rank"] is not None)
    return ExplorerFrame(
        step=step, label=label, result=result, page_size=ps, tree=tree, pages=pages,
        free_tokens=allocator.available_size(), evictable_tokens=cache.evictable_size(),
        protected_tokens=cache.protected_size(), request_tokens=sum(p.owner == "request" for p in pages) * ps,
        lru_order=[i for _, i in lru], highlight=dict(highlight or {}), evicted=list(evicted),
        running={str(name): req.last_node.id for name, req in running.items() if req.last_node is not None},
    )


def cache_html(cache: RadixCache, running: dict[str, Req] | None = None, label: str = "") -> str:
    """Draw any :class:`RadixCache` (tree, pool strip, counters): :func:`frame_html` of :func:`snapshot_cache`."""
    return frame_html(snapshot_cache(cache, running, label=label or "the cache now"))


def _walk(node: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node dict below ``node`` (excluded), parents first."""
    out = []
    for child in node["children"]:
        out.append(child)
        out.extend(_walk(child))
    return out
