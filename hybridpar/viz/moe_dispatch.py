"""Routing a batch to experts and ranks, and the dispatch / combine all-to-all, step by step (static widget).

:func:`moe_routing` routes a small batch (a seeded random router, the same top-k rule as the model,
:func:`~hybridpar.layers.fused_moe.select_experts`) and plans every token owner's dispatch with the
package's own :class:`~hybridpar.layers.moe_dispatch.DispatchPlan`; :func:`moe_frames_html` draws
one HTML frame per stage; :func:`moe_dispatch_explorer` puts every (layout, stage) in ``jslink``-ed
stacks (:func:`~hybridpar.viz.static.linked_stacks`), so both controls work in the static book.
Colour: the EP rank that owns an expert (and, in the matrices, the sending rank).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hybridpar.layers.fused_moe import select_experts
from hybridpar.layers.moe_dispatch import DispatchPlan, imbalance
from hybridpar.viz.colors import TEXT_COLOR, rank_color

if TYPE_CHECKING:
    import ipywidgets

STAGES = ("route", "count exchange", "dispatch", "experts", "combine", "sum")
LAYOUTS = ((2, 1), (2, 2), (4, 1))  # (tp, tknp): EP 2 over TP 2, EP 4 over TP 2 x TKNP 2, EP 4 over TP 4


@dataclass(frozen=True)
class MoeRouting:
    """One MoE layer's routing of ``T`` tokens under a layout, and each EP rank's dispatch plan."""

    tp: int
    tknp: int
    num_experts: int
    topk_ids: torch.Tensor  # [T, k]
    topk_weights: torch.Tensor  # [T, k]
    owner: list[int]  # EP rank routing each token (a TP rank of the roots)
    plans: list[DispatchPlan]  # one per EP rank (empty for ranks that own no token)

    @property
    def ep(self) -> int:
        return self.tp * self.tknp

    @property
    def label(self) -> str:
        return f"EP {self.ep} over TP {self.tp}" + (f" x TKNP {self.tknp}" if self.tknp > 1 else "")

    def expert_rank(self, expert: int) -> int:
        return expert // (self.num_experts // self.ep)

    def send_matrix(self) -> list[list[int]]:
        """``m[src][dst]``: rows ``src`` dispatches to ``dst`` (the combine sends ``m[src][dst]`` back)."""
        return [p.send_sizes for p in self.plans]


def moe_routing(num_tokens: int = 6, num_experts: int = 8, top_k: int = 2, tp: int = 2, tknp: int = 1,
                seed: int = 0) -> MoeRouting:
    """Route ``num_tokens`` tokens with a seeded random router; TP rank ``r`` of the roots owns chunk ``r``."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(num_tokens, num_experts, generator=gen)
    weights, ids = select_experts(logits, top_k, renormalize=False)
    chunks = torch.tensor_split(torch.arange(num_tokens), tp)
    owner = [r for r, c in enumerate(chunks) for _ in c]
    ep = tp * tknp
    plans = [DispatchPlan.build(ids[chunks[r]] if r < tp else ids[:0], num_experts, ep) for r in range(ep)]
    return MoeRouting(tp, tknp, num_experts, ids, weights, owner, plans)


def _cell(text: str, color: str | None = None, bold: bool = False) -> str:
    style = f"padding:0.15em 0.45em;border:1px solid #ddd;color:{TEXT_COLOR}" + (f";background:{color}" if color else "")
    body = f"<b>{html.escape(text)}</b>" if bold else html.escape(text)
    return f'<td style="{style}">{body}</td>'


def _table(rows: Sequence[str]) -> str:
    return f'<table style="border-collapse:collapse;font-size:0.85em">{"".join(rows)}</table>'


def _matrix(r: MoeRouting, back: bool) -> str:
    m = r.send_matrix()
    head = "<tr>" + _cell("from \\ to") + "".join(_cell(f"rank {d}", rank_color(d)) for d in range(r.ep)) + "</tr>"
    rows = [head]
    for a in range(r.ep):
        vals = [m[b][a] if back else m[a][b] for b in range(r.ep)]
        rows.append("<tr>" + _cell(f"rank {a}", rank_color(a)) + "".join(
            _cell("empty" if v == 0 else f"{v} rows", None if v == 0 else rank_color(a), bold=(v > 0 and b != a))
            for b, v in enumerate(vals)) + "</tr>")
    return _table(rows)


def _stage_body(r: MoeRouting, stage: str) -> tuple[str, str]:
    k, per_rank = r.topk_ids.shape[1], r.num_experts // r.ep
    if stage == "route":
        rows = ["<tr>" + "".join(_cell(c) for c in ("token", "routed by", *[f"choice {j}" for j in range(k)])) + "</tr>"]
        for t in range(r.topk_ids.shape[0]):
            rows.append("<tr>" + _cell(f"t{t}") + _cell(f"rank {r.owner[t]}", rank_color(r.owner[t])) + "".join(
                _cell(f"expert {e} ({w:.2f})", rank_color(r.expert_rank(e)))
                for e, w in zip(r.topk_ids[t].tolist(), r.topk_weights[t].tolist())) + "</tr>")
        counts = torch.bincount(r.topk_ids.reshape(-1), minlength=r.num_experts)
        return (f"Every token picks its top-{k} experts (softmax weight in brackets). Per-expert counts "
                f"{counts.tolist()}: imbalance max/mean = {imbalance(counts):.2f}.", _table(rows))
    if stage == "count exchange":
        rows = ["<tr>" + _cell("rank") + "".join(_cell(f"e{e}", rank_color(r.expert_rank(e)))
                                                 for e in range(r.num_experts)) + "</tr>"]
        for a, p in enumerate(r.plans):
            rows.append("<tr>" + _cell(f"rank {a}", rank_color(a)) + "".join(_cell(str(c)) for c in
                                                                             p.expert_counts.tolist()) + "</tr>")
        return ("Each rank counts its rows per expert and sends every rank the counts for that rank's experts "
                "(one small all-to-all): now every receiver knows the size of every piece.", _table(rows))
    if stage == "dispatch":
        return ("all_to_all_single with split sizes: each rank sends each row to the owner of its expert. "
                "'empty' pieces are real (zero-size) sends; ranks without tokens send only empty pieces.",
                _matrix(r, back=False))
    if stage == "experts":
        m = r.send_matrix()
        rows = ["<tr>" + "".join(_cell(c) for c in ("rank", "holds experts", "rows received")) + "</tr>"]
        for d in range(r.ep):
            rows.append("<tr>" + _cell(f"rank {d}", rank_color(d)) + _cell(f"{d * per_rank}..{(d + 1) * per_rank - 1}")
                        + _cell(str(sum(m[s][d] for s in range(r.ep)))) + "</tr>")
        return ("Each rank runs its whole experts on the rows it received (one small GEMM pair per expert).",
                _table(rows))
    if stage == "combine":
        return ("The reverse all-to-all: every result row goes back to the rank that sent it (split sizes "
                "transposed).", _matrix(r, back=True))
    return (f"Each token owner adds weight x result into its tokens' rows, then one all-reduce over TP "
            f"{r.tp} (shared expert included) gives every TP rank all {r.topk_ids.shape[0]} outputs.", "")


def moe_frames_html(r: MoeRouting) -> list[str]:
    """The HTML of every stage of ``r``'s MoE step."""
    out = []
    for i, stage in enumerate(STAGES):
        summary, body = _stage_body(r, stage)
        out.append(f'<div class="hybridpar-moe" style="color:{TEXT_COLOR};background:white;padding:0.4em;'
                   f'border:1px solid #ddd;border-radius:4px"><div><b>{html.escape(r.label)}, step {i + 1}/'
                   f'{len(STAGES)}: {html.escape(stage)}</b></div><div style="font-size:0.9em;margin:0.2em 0">'
                   f'{html.escape(summary)}</div><div style="overflow-x:auto">{body}</div></div>')
    return out


def moe_dispatch_explorer(layouts: Sequence[tuple[int, int]] = LAYOUTS, num_tokens: int = 6,
                          seed: int = 0) -> ipywidgets.VBox:
    """A layout dropdown and a stage slider over precomputed frames (works without a kernel)."""
    import ipywidgets as widgets

    from hybridpar.viz.static import linked_stacks

    routings = [moe_routing(num_tokens, tp=tp, tknp=k, seed=seed) for tp, k in layouts]
    style = {"description_width": "initial"}
    pick = widgets.Dropdown(options=[r.label for r in routings], description="layout", style=style)
    stage = widgets.SelectionSlider(options=list(STAGES), value=STAGES[0], description="step", style=style)
    frames = [[widgets.HTML(h) for h in moe_frames_html(r)] for r in routings]
    return widgets.VBox([widgets.HBox([pick, stage]), linked_stacks([pick, stage], frames)])
