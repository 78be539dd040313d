"""The frames of one token-parallel pass, stage by stage, and their drawing (plain data, then HTML).

:func:`flow_frames` turns a :class:`~hybridpar.viz.tknp_flow.StepFlow` (which rank holds which
request, the split sizes, the KV each rank keeps) into one :class:`FlowFrame` per stage of
:data:`STAGES`: what every rank holds and does, with the tensor shapes and bytes that move. The
drawing functions are pure functions of a frame, so every state can be drawn in advance for the
static book.
"""
from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridpar.viz.colors import TEXT_COLOR, rank_color
from hybridpar.viz.units import format_binary

if TYPE_CHECKING:
    from hybridpar.tknp.attention import AttentionGeometry
    from hybridpar.viz.tknp_flow import StepFlow

STAGES = ("plan", "qkv", "scatter", "attend", "gather", "rest")
STAGE_TITLES = {
    "plan": "1. plan: place the requests, broadcast the sub-batches",
    "qkv": "2. QKV on the root, tokens regrouped by owner",
    "scatter": "3. scatterv: each rank receives its requests' q, k, v",
    "attend": "4. attention: every rank against its own KV cache",
    "gather": "5. gatherv: outputs back to the root, batch order restored",
    "rest": "6. the rest of the layer, on the root only",
}


@dataclass(frozen=True)
class RankRow:
    """One global rank in one stage: its coordinates, role, the requests it owns, what it holds and does."""

    rank: int
    tp_rank: int
    tknp_rank: int
    role: str  # "root" or "attention"
    requests: tuple[int, ...]
    holds: str
    does: str
    active: bool


@dataclass(frozen=True)
class FlowFrame:
    """One stage of the pass. ``tokens``: the request of every new token in the order this stage
    holds them (``None``: no token strip); ``grouped``: whether that order is rank-grouped."""

    stage: str
    title: str
    summary: str
    tokens: tuple[int, ...] | None
    grouped: bool
    rows: tuple[RankRow, ...]


def _shape(*dims: object) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _rank_row(flow: StepFlow, rank: int, holds: str, does: str, active: bool) -> RankRow:
    c = flow.layout.coords(rank)
    return RankRow(rank, c["tp"], c["tknp"], "root" if c["tknp"] == 0 else "attention",
                   tuple(flow.requests_on(c["tknp"])), holds, does, active)


def flow_frames(flow: StepFlow) -> list[FlowFrame]:
    """One :class:`FlowFrame` per stage of :data:`STAGES` (see the module docstring)."""
    T, h, L = flow.num_tokens, flow.model.hidden_size, flow.model.num_layers
    t = flow.tensor_parallel_size
    sizes, kv = flow.split_sizes, flow.kv_tokens
    batch, grouped = tuple(flow.token_requests()), tuple(flow.token_requests(grouped=True))
    frames: list[FlowFrame] = []

    def rows(describe) -> tuple[RankRow, ...]:
        return tuple(_rank_row(flow, rank, *describe(flow.layout.coords(rank)))
                     for rank in range(flow.layout.world_size))

    def geom(c: dict[str, int]) -> AttentionGeometry:
        return flow.heads[c["tp"]]

    def sub(c: dict[str, int]) -> str:
        sb = flow.plan.sub_batches[c["tknp"]]
        parts = [f"r{i}: row {row}, {p} cached + {n} new" for i, row, p, n in
                 zip(flow.running_on(c["tknp"]), sb.req_pool_indices, sb.prefix_lens, sb.extend_lens)]
        waiting = [i for i in flow.requests_on(c["tknp"]) if i in flow.waiting]
        if waiting:
            parts.append(f"waiting: {' '.join(f'r{i}' for i in waiting)} (this rank prefills first)")
        return "; ".join(parts) or "no request this pass"

    running = (f"all {len(flow.requests)} requests" if not flow.waiting else
               f"{len(flow.running)} of its {len(flow.requests)} requests")

    def plan(c):
        if c["tknp"] == 0:
            return (f"hidden {_shape(T, h)}: {running}, {T} new tokens",
                    f"places new requests by reserved KV tokens (reservations {list(flow.reservations)}); "
                    f"broadcasts the plan of the pass (split sizes {sizes}) to its TKNP group", True)
        return (f"its sub-batch: {sub(c)}", "receives the plan; builds its own ForwardBatch", True)

    frames.append(FlowFrame("plan", STAGE_TITLES["plan"],
                            f"{len(flow.requests)} requests, {T} new tokens; TKNP rank r owns the requests "
                            f"of its colour. New tokens per TKNP rank: {sizes}; KV tokens per rank: {kv}."
                            + (f" Waiting this pass: {' '.join(f'r{i}' for i in flow.waiting)} (their rank prefills "
                               f"a newly arrived request first, the scheduler's rule)." if flow.waiting else ""),
                            batch, False, rows(plan)))

    def qkv(c):
        g = geom(c)
        if c["tknp"] == 0:
            return (f"q {_shape(T, g.num_heads, g.head_dim)}, k and v {_shape(T, g.num_kv_heads, g.head_dim)} "
                    f"→ packed {_shape(T, g.packed_heads, g.head_dim)}",
                    f"qkv_proj with its {g.num_heads} q / {g.num_kv_heads} KV heads (TP rank {c['tp']} of {t}); "
                    f"concatenates [q | k | v] and reorders the tokens: packed[order]", True)
        return ("nothing yet", "waits in the scatterv", False)

    frames.append(FlowFrame("qkv", STAGE_TITLES["qkv"],
                            f"Only the roots run the projections. The tokens are regrouped so that each rank's "
                            f"are contiguous: order = {list(flow.order)}.", grouped, True, rows(qkv)))

    def scatter(c):
        g = geom(c)
        n = sizes[c["tknp"]]
        piece = f"packed {_shape(n, g.packed_heads, g.head_dim)}"
        if c["tknp"] == 0:
            return (f"keeps its own {piece}",
                    f"sends {format_binary(flow.scatter_bytes(c['tp']))} per layer to the other ranks", True)
        return (f"receives {piece}", "unpacks q, k, v by head counts", n > 0)

    frames.append(FlowFrame("scatter", STAGE_TITLES["scatter"],
                            f"scatterv with split sizes {sizes}: the pieces differ in size because requests "
                            f"do (a prefill brings all its prompt tokens, a decode one token).",
                            grouped, True, rows(scatter)))

    def attend(c):
        g = geom(c)
        n, r = sizes[c["tknp"]], c["tknp"]
        return (f"o {_shape(n, g.num_heads, g.head_dim)}",
                f"writes {n} new K/V rows into its cache, attends over {kv[r]} KV tokens: reads "
                f"{format_binary(flow.kv_read_bytes(r, c['tp']))} per layer", n > 0)

    frames.append(FlowFrame("attend", STAGE_TITLES["attend"],
                            "Every rank, the root included, attends only for its own requests, against the "
                            "KV cache it alone holds. KV reads split by request, not by head.",
                            grouped, True, rows(attend)))

    def gather(c):
        g = geom(c)
        if c["tknp"] == 0:
            return (f"o {_shape(T, g.num_heads, g.head_dim)}, back in batch order",
                    f"receives {format_binary(flow.gather_bytes(c['tp']))} per layer; out[order] = grouped", True)
        return (f"sends o {_shape(sizes[c['tknp']], g.num_heads, g.head_dim)}", "gatherv to the root",
                sizes[c["tknp"]] > 0)

    frames.append(FlowFrame("gather", STAGE_TITLES["gather"],
                            f"gatherv with the same split sizes {sizes}; the root undoes the regrouping.",
                            batch, False, rows(gather)))

    def rest(c):
        if c["tknp"] == 0:
            reduce = f", all-reduce over the {t} roots" if t > 1 else ""
            return (f"hidden {_shape(T, h)}", f"o_proj{reduce}, MLP, next layer's QKV; after layer {L}: LM "
                                              f"head and sampling for {len(flow.running)} requests", True)
        return ("its KV cache, no weights", f"idle until the next layer's scatterv ({L} layers: {L} scatters "
                                            f"and {L} gathers per pass)", False)

    frames.append(FlowFrame("rest", STAGE_TITLES["rest"],
                            "The projections, the MLP and the LM head run on the roots alone: this part of the "
                            "step does not shrink when TKNP ranks are added.", None, False, rows(rest)))
    return frames


# --------------------------------------------------------------------------- drawing
_CELL = f"padding:0.15em 0.4em;border:1px solid #777;color:{TEXT_COLOR};font-family:monospace;white-space:nowrap"


def _token_strip(flow: StepFlow, tokens: Sequence[int]) -> str:
    """Runs of consecutive tokens of one request, one cell each, coloured by the request's TKNP rank."""
    runs: list[list[int]] = []
    for req in tokens:
        if runs and runs[-1][0] == req:
            runs[-1][1] += 1
        else:
            runs.append([req, 1])
    cells = "".join(
        f'<td style="{_CELL};background:{rank_color(flow.placement[req])}" '
        f'title="request {req} on TKNP rank {flow.placement[req]}">r{req}{"" if n == 1 else f" ×{n}"}</td>'
        for req, n in runs)
    return f'<table style="border-collapse:collapse;margin:0.2em 0"><tr>{cells}</tr></table>'


def frame_html(flow: StepFlow, frame: FlowFrame) -> str:
    """One stage: its title and summary, the token strip, and a row per global rank."""
    strip = ""
    if frame.tokens is not None:
        what = "grouped by owner rank" if frame.grouped else "in batch order"
        strip = (f'<div style="font-size:0.85em">new tokens, {what}:</div>'
                 f'<div style="overflow-x:auto">{_token_strip(flow, frame.tokens)}</div>')
    head = "".join(f'<th style="text-align:left;padding:0 0.4em">{c}</th>'
                   for c in ("rank", "tp", "tknp", "role", "requests", "holds", "does"))
    body = []
    for r in frame.rows:
        style = f"background:{rank_color(r.tknp_rank)}" + ("" if r.active else ";opacity:0.55")
        reqs = " ".join(f"r{i}" for i in r.requests) or "-"
        cells = [str(r.rank), str(r.tp_rank), str(r.tknp_rank), r.role, reqs, r.holds, r.does]
        body.append(f'<tr style="{style}">' + "".join(
            f'<td style="padding:0.15em 0.4em;vertical-align:top;color:{TEXT_COLOR}">{html.escape(c)}</td>'
            for c in cells) + "</tr>")
    return (f'<div class="hybridpar-tknp-flow" style="color:{TEXT_COLOR};background:white;padding:0.4em;'
            f'border:1px solid #ddd;border-radius:4px">'
            f'<div><b>{html.escape(flow.label)}, {html.escape(flow.model.name)}: {html.escape(frame.title)}</b></div>'
            f'<div style="font-size:0.9em;margin:0.2em 0">{html.escape(frame.summary)}</div>{strip}'
            f'<div style="overflow-x:auto"><table style="border-collapse:collapse;font-size:0.85em">'
            f'<tr>{head}</tr>{"".join(body)}</table></div>'
            f'<div style="font-size:0.8em">Colour: the TKNP rank that owns a request; faded rows wait in this '
            f'stage.</div></div>')


def flow_html(flow: StepFlow, stage: str) -> str:
    """The HTML of one stage of ``flow`` (for static pages)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")
    return frame_html(flow, flow_frames(flow)[STAGES.index(stage)])
