"""The radix-tree explorer of chapter 5: a real :class:`~hybridpar.radix.RadixCache`, driven by text, drawn.

Three layers, checked against each other in ``tests/test_radix_explorer.py``:

* :class:`RadixSandbox` runs a :class:`RadixCache` over small real pools. A prompt is text, one
  byte per token (the byte-level tokenizer of the built-in checkpoints does the same), and every
  operation goes through the same calls the scheduler makes (:func:`~hybridpar.radix.start_req`,
  :func:`~hybridpar.radix.alloc_for_extend`, ``cache_unfinished_req``, ``cache_finished_req``,
  ``match_prefix``, ``evict``). :meth:`RadixSandbox.snapshot` reads the state back from the cache
  and the pools (``tree_to_dict(cache)``, the allocator's free list, the request rows).
* :func:`trace` applies a script of :class:`CacheOp` to a fresh sandbox and returns one
  :class:`ExplorerFrame` per step (frame 0 is the empty cache).
* :func:`frame_html` draws a frame: the tree as SVG (each node with its text, token count, lock
  count and place in the LRU eviction order) and the pool as a strip of pages coloured by owner.
  :func:`radix_explorer` shows precomputed frames behind a ``jslink``-ed slider (works in the
  static book); :func:`radix_playground` runs the operations live in Python callbacks (needs a
  live kernel: in the book its cell is tagged ``remove-output``, see :mod:`hybridpar.viz.static`).

The five operations (:class:`CacheOp`):

``insert``  a request arrives, is prefilled and finishes: its cached prefix is reused, the rest
            gets fresh pages (evicting least recently used leaves if the pool is short), and
            ``cache_finished_req`` hands its whole pages to the tree;
``match``   ``match_prefix``: the longest cached prefix in whole pages (may split a node; refreshes
            the LRU time of the path);
``lock``    a request ``name`` is admitted and prefilled but keeps running: its prompt goes into the
            tree at once (``cache_unfinished_req``), locked, so nothing it needs can be evicted; the
            partial last page stays the request's own;
``unlock``  the running request ``name`` finishes (``cache_finished_req``): its lock is released;
``evict``   ``evict(num_tokens)``: free unlocked leaves, least recently used first.

ipywidgets is imported inside the widget functions, so importing this module stays cheap.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridpar.radix.allocation import alloc_for_extend, start_req
from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.radix_cache import RadixCache
from hybridpar.core import Req
from hybridpar.viz.radix_frames import (  # noqa: F401  (the explorer's API)
    ExplorerFrame,
    PageState,
    cache_html,
    frame_html,
    layout_tree,
    pool_svg,
    snapshot_cache,
    text_tokens,
    tokens_text,
    tree_svg,
)
from hybridpar.viz.static import linked_stacks

if TYPE_CHECKING:
    import ipywidgets

OP_KINDS = ("insert", "match", "lock", "unlock", "evict")



@dataclass(frozen=True)
class CacheOp:
    """One step of a script: ``kind`` in :data:`OP_KINDS`; ``text`` for insert/match/lock, ``name`` for
    lock/unlock, ``num_tokens`` for evict. Build them with :func:`insert`, :func:`match`, ... ."""

    kind: str
    text: str = ""
    name: str = ""
    num_tokens: int = 0

    def label(self) -> str:
        if self.kind == "evict":
            return f"evict {self.num_tokens} tokens"
        if self.kind == "unlock":
            return f"unlock {self.name} (the request finishes)"
        who = f" {self.name}" if self.kind == "lock" else ""
        return f"{self.kind}{who} {self.text!r}"


def insert(text: str) -> CacheOp:
    return CacheOp("insert", text=text)


def match(text: str) -> CacheOp:
    return CacheOp("match", text=text)


def lock(name: str, text: str) -> CacheOp:
    return CacheOp("lock", text=text, name=name)


def unlock(name: str) -> CacheOp:
    return CacheOp("unlock", name=name)


def evict(num_tokens: int) -> CacheOp:
    return CacheOp("evict", num_tokens=num_tokens)


class _TracingCache(RadixCache):
    """A RadixCache that remembers which nodes its evictions removed (for the frame's ``evicted``)."""

    def reset(self) -> None:
        super().reset()
        self.evicted_ids: list[int] = []

    def evict(self, num_tokens: int) -> int:
        before = {n.id for n in self.nodes()}
        freed = super().evict(num_tokens)
        self.evicted_ids.extend(sorted(before - {n.id for n in self.nodes()}))
        return freed


class RadixSandbox:
    """A :class:`RadixCache` over a pool of ``pool_tokens`` slots in pages of ``page_size``, driven by text.

    ``max_requests`` rows of the request-to-token table bound the running (locked) requests.
    Every method returns a one-line description of what happened; :meth:`snapshot` returns the state.
    """

    def __init__(self, pool_tokens: int = 64, page_size: int = 4, max_requests: int = 8) -> None:
        self.page_size = page_size
        self.allocator = TokenToKVPoolAllocator(pool_tokens, page_size)
        self.rows = ReqToTokenPool(max_requests, self.allocator.size)
        self.cache = _TracingCache(self.rows, self.allocator)
        self.running: dict[str, Req] = {}
        self._rid = 0

    # ------------------------------------------------------------------ operations
    def apply(self, op: CacheOp) -> str:
        """Run one :class:`CacheOp`; bad input raises ValueError before anything changes."""
        if op.kind not in OP_KINDS:
            raise ValueError(f"unknown operation {op.kind!r}; choose one of {OP_KINDS}")
        if op.kind == "evict":
            return self.evict(op.num_tokens)
        if op.kind == "unlock":
            return self.unlock(op.name)
        if op.kind == "match":
            return self.match(op.text)
        if op.kind == "insert":
            return self.insert(op.text)
        return self.lock(op.name, op.text)

    def _check_text(self, text: str) -> list[int]:
        tokens = text_tokens(text)
        if not tokens:
            raise ValueError("the prompt is empty; type at least one character")
        if len(tokens) > self.rows.max_context_len:
            raise ValueError(f"the prompt has {len(tokens)} tokens but the pool holds {self.allocator.size}; "
                             f"shorten it or build the sandbox with a larger pool_tokens")
        return tokens

    def _prefill(self, tokens: list[int]) -> tuple[Req | None, int, str]:
        """Admit a request for ``tokens`` and give all of them KV slots; (req or None, cached tokens, note)."""
        self._rid += 1
        req = Req(f"r{self._rid}", tokens)
        if not start_req(self.cache, req):
            return None, 0, "no free request row (too many running requests)"
        hit = req.kv_len
        freed_before = len(self.cache.evicted_ids)
        if alloc_for_extend(self.cache, [req], [len(tokens) - req.kv_len]) is None:
            self.cache.dec_lock_ref(req.last_node)  # undo start_req: nothing else changed
            self.rows.free(req.req_pool_idx)
            return None, hit, "does not fit: every page is locked or in use"
        evicted = self.cache.evicted_ids[freed_before:]
        note = f"; evicted node(s) {', '.join(f'#{i}' for i in evicted)} to make room" if evicted else ""
        return req, hit, note

    def insert(self, text: str) -> str:
        tokens = self._check_text(text)
        req, hit, note = self._prefill(tokens)
        if req is None:
            return f"not inserted: {note}"
        self.cache.cache_finished_req(req)
        cached = len(tokens) // self.page_size * self.page_size
        tail = len(tokens) - cached
        return (f"reused {hit} cached tokens, computed {len(tokens) - hit}{note}; the tree keeps {cached} tokens"
                + (f" ({tail} on a partial page freed)" if tail else ""))

    def match(self, text: str) -> str:
        tokens = self._check_text(text)
        result = self.cache.match_prefix(tokens)
        if not result.prefix_len:
            return f"no cached prefix (0 of {len(tokens)} tokens)"
        return f"longest cached prefix: {result.prefix_len} of {len(tokens)} tokens, ending at node #{result.last_node.id}"

    def lock(self, name: str, text: str) -> str:
        if not name:
            raise ValueError("a running request needs a name, e.g. 'r1'")
        if name in self.running:
            raise ValueError(f"request {name!r} is already running; unlock it first or pick another name")
        tokens = self._check_text(text)
        req, hit, note = self._prefill(tokens)
        if req is None:
            return f"{name} not admitted: {note}"
        self.cache.cache_unfinished_req(req)
        self.running[name] = req
        return (f"{name} reused {hit} cached tokens, computed {len(tokens) - hit}{note}; its prompt is in the tree, "
                f"locked at node #{req.last_node.id}")

    def unlock(self, name: str) -> str:
        if name not in self.running:
            raise ValueError(f"no running request {name!r}; running: {sorted(self.running) or 'none'}")
        req = self.running.pop(name)
        node = req.last_node.id
        self.cache.cache_finished_req(req)
        return f"{name} finished: its lock on node #{node} and its ancestors is released"

    def evict(self, num_tokens: int) -> str:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"evict needs a number of tokens >= 1, got {num_tokens!r}")
        freed_before = len(self.cache.evicted_ids)
        freed = self.cache.evict(num_tokens)
        ids = self.cache.evicted_ids[freed_before:]
        if not ids:
            return "nothing to evict: every cached node is locked (or the tree is empty)"
        return f"freed {freed} tokens: node(s) {', '.join(f'#{i}' for i in ids)}"

    # ------------------------------------------------------------------ state
    def check(self) -> None:
        """The cache's own integrity check, with every running request (raises IntegrityError)."""
        self.cache.check_integrity(list(self.running.values()))

    def snapshot(self, step: int = 0, label: str = "", result: str = "",
                 highlight: dict[int, str] | None = None, evicted: Sequence[int] = ()) -> ExplorerFrame:
        """The current state as an :class:`ExplorerFrame` (see :func:`snapshot_cache`)."""
        return snapshot_cache(self.cache, self.running, step, label, result, highlight, evicted)

    def step(self, op: CacheOp, step: int = 0) -> ExplorerFrame:
        """Apply ``op`` and return the frame after it, with the nodes it touched highlighted."""
        before = {n.id for n in self.cache.nodes()}
        evicted_before = len(self.cache.evicted_ids)
        result = self.apply(op)
        highlight: dict[int, str] = {}
        if op.kind in ("insert", "match", "lock"):
            for node in self.cache.nodes():
                if node.id not in before:  # the upper half of a split (its lower half is older), or a new leaf
                    split = any(c.id in before for c in node.children.values())
                    highlight[node.id] = "split" if split else "new"
            for node in _path_nodes(self.cache, text_tokens(op.text)):
                highlight.setdefault(node.id, "matched")
        return self.snapshot(step, op.label(), result, highlight, self.cache.evicted_ids[evicted_before:])


def _path_nodes(cache: RadixCache, tokens: list[int]) -> list[Any]:
    """Nodes on the cached path of ``tokens`` (read-only: no split, no LRU update)."""
    node, pos, out = cache.root_node, 0, []
    while pos < len(tokens):
        child = node.children.get(cache.child_key(tuple(tokens[pos:])))
        if child is None or tuple(tokens[pos:pos + len(child.key)]) != child.key:
            break
        out.append(child)
        pos += len(child.key)
        node = child
    return out


def trace(ops: Sequence[CacheOp], pool_tokens: int = 64, page_size: int = 4, max_requests: int = 8,
          check: bool = True) -> list[ExplorerFrame]:
    """Frames of a script: frame 0 is the empty cache, frame ``k`` the state after ``ops[k - 1]``.

    With ``check`` the cache's integrity check runs after every step (with the running requests).
    """
    bad = [op.kind for op in ops if op.kind not in OP_KINDS]
    if bad:
        raise ValueError(f"unknown operation(s) {bad}; choose from {OP_KINDS}")
    box = RadixSandbox(pool_tokens, page_size, max_requests)
    frames = [box.snapshot(0, "empty cache", f"{box.allocator.num_pages} free pages of {page_size} tokens")]
    for k, op in enumerate(ops, start=1):
        frames.append(box.step(op, k))
        if check:
            box.check()
    return frames


# A scripted walk through every operation, sized so that it fills the default pool (16 pages of 4).
SYS_A = "SYS: be terse|"
SYS_B = "SYS: be kind|"
DEFAULT_SCRIPT: tuple[CacheOp, ...] = (
    insert(SYS_A + "Q: sky color?"),
    insert(SYS_A + "Q: sea color?"),
    match(SYS_A + "Q: snow?"),
    lock("r1", SYS_A + "Q: sun color?"),
    lock("r2", SYS_B + "Q: hi!"),
    insert(SYS_B + "Q: how are you?"),
    evict(8),
    unlock("r1"),
    match(SYS_A + "Q: sky color?"),
    evict(64),
    unlock("r2"),
)


# ---------------------------------------------------------------------------- widgets
def radix_explorer(ops: Sequence[CacheOp] = DEFAULT_SCRIPT, pool_tokens: int = 64, page_size: int = 4,
                   max_requests: int = 8) -> ipywidgets.VBox:
    """Every step of ``ops`` drawn in advance; a slider ``jslink``-ed to a ``Stack`` picks the frame,
    so it works in the static book with no kernel. (No ``Play`` button: its animation needs a kernel
    to sync with, and linked to the slider it stops the slider from switching frames in the book.)"""
    import ipywidgets as widgets

    frames = trace(ops, pool_tokens, page_size, max_requests)
    last = len(frames) - 1
    slider = widgets.IntSlider(value=0, min=0, max=last, description="step", continuous_update=True,
                               style={"description_width": "initial"}, layout=widgets.Layout(width="32em"))
    return widgets.VBox([slider, linked_stacks([slider], [widgets.HTML(frame_html(f, last)) for f in frames])])


def radix_playground(pool_tokens: int = 64, page_size: int = 4, max_requests: int = 8,
                     ops: Sequence[CacheOp] = ()) -> ipywidgets.VBox:
    """Type a prompt and press a button: the operation runs on a live :class:`RadixSandbox` and the
    view redraws (Python callbacks, kernel-only: in the book, tag its cell ``remove-output``;
    :func:`radix_explorer` is its static twin). ``ops`` are applied first."""
    import ipywidgets as widgets

    box = RadixSandbox(pool_tokens, page_size, max_requests)
    history: list[str] = []
    for op in ops:
        box.apply(op)
        history.append(op.label())
    text_w = widgets.Text(value=SYS_A + "Q: ", description="prompt", layout=widgets.Layout(width="28em"))
    name_w = widgets.Text(value="r1", description="request", layout=widgets.Layout(width="12em"))
    evict_w = widgets.BoundedIntText(value=page_size, min=1, max=pool_tokens, description="tokens",
                                     layout=widgets.Layout(width="12em"))
    buttons = {kind: widgets.Button(description=kind, tooltip=kind) for kind in (*OP_KINDS, "reset")}
    out = widgets.HTML()

    def show(frame: ExplorerFrame) -> None:
        out.value = frame_html(frame) + (f'<div style="font-size:0.8em">history: {html.escape(" · ".join(history))}'
                                         f'</div>' if history else "")

    def run(kind: str) -> None:
        nonlocal box
        if kind == "reset":
            box, history[:] = RadixSandbox(pool_tokens, page_size, max_requests), []
            show(box.snapshot(0, "empty cache"))
            return
        op = CacheOp(kind, text=text_w.value, name=name_w.value, num_tokens=evict_w.value)
        try:
            frame = box.step(op, len(history) + 1)
        except ValueError as err:
            out.value = f"<p><b>Not possible:</b> {html.escape(str(err))}</p>" + out.value
            return
        history.append(op.label())
        show(frame)

    for kind, button in buttons.items():
        button.on_click(lambda _b, kind=kind: run(kind))
    show(box.snapshot(len(history), history[-1] if history else "empty cache"))
    return widgets.VBox([widgets.HBox([text_w, name_w, evict_w]), widgets.HBox(list(buttons.values())), out])
