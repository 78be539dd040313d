"""Which rank read which part of every tensor of a real checkpoint: computed, drawn, and explored.

The input is what the ranks of :func:`hybridpar.demos.tp_anatomy.run_anatomy` recorded while they
loaded a checkpoint sharded: for every checkpoint tensor, the index range of every read
(``reads_by_rank[r][name]`` is a :class:`~hybridpar.demos.tp_anatomy.TensorReads`). Nothing here
re-derives the sharding rules: the map is what the weight loaders actually did.

* :func:`checkpoint_ownership` (pure) turns the reads into one :class:`TensorOwnership` per tensor:
  the dimension the ranks split it along (``None`` if every rank read it whole) and the segments of
  that dimension with the ranks holding each (several ranks: a replicated segment, such as a KV head
  when TP > KV heads).
* :func:`plot_checkpoint_map` draws every tensor as a bar, in forward order, coloured by rank; a
  segment that several ranks hold is drawn as thin bars stacked on each other, one per copy.
* :func:`checkpoint_map_html` is the figure plus a table of the first layer, as static HTML;
  :func:`checkpoint_map_explorer` stacks one per TP size behind toggle buttons ``jslink``-ed to the
  stack, so it works in the static book without a kernel.

matplotlib and ipywidgets are imported inside the functions that draw.
"""
from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hybridpar.viz.colors import TEXT_COLOR, rank_color
from hybridpar.viz.static import linked_stacks

if TYPE_CHECKING:
    import ipywidgets
    from matplotlib.axes import Axes

# Order of a decoder layer's tensors in the drawing (forward order), then weight before bias.
LAYER_ORDER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.q_norm",
               "self_attn.k_norm", "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Segment:
    """``[start, stop)`` along the split dimension, held by ``ranks`` (empty: nobody read it)."""

    start: int
    stop: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class TensorOwnership:
    """Who holds what of one checkpoint tensor.

    Invariants: the segments tile ``[0, shape[split_dim])`` in order (``[0, shape[0])`` when
    ``split_dim`` is None, i.e. every rank that read the tensor read it whole); adjacent segments have
    different ``ranks``.
    """

    name: str
    shape: tuple[int, ...]
    split_dim: int | None
    segments: tuple[Segment, ...]

    @property
    def split(self) -> str:
        """``"rows"``, ``"columns"`` or ``"whole"`` (of the checkpoint tensor ``W``)."""
        return {None: "whole", 0: "rows", 1: "columns"}.get(self.split_dim, f"dim {self.split_dim}")

    @property
    def extent(self) -> int:
        return self.shape[self.split_dim or 0]

    def ranges_of(self, rank: int) -> list[tuple[int, int]]:
        """The ranges of the split dimension ``rank`` holds, adjacent segments merged."""
        out: list[tuple[int, int]] = []
        for s in self.segments:
            if rank in s.ranks:
                if out and out[-1][1] == s.start:
                    out[-1] = (out[-1][0], s.stop)
                else:
                    out.append((s.start, s.stop))
        return out


def order_key(name: str) -> tuple[int, int, int, str]:
    """Drawing order: embedding, then the layers in order (forward order inside), final norm, LM head."""
    m = _LAYER.match(name)
    if m:
        rest = m[2]
        pos = next((i for i, frag in enumerate(LAYER_ORDER) if rest.startswith(frag + ".")), len(LAYER_ORDER))
        return (1, int(m[1]), pos, "1" if rest.endswith(".bias") else "0")
    return (0 if "embed_tokens" in name else 2 if name.startswith("model.") else 3, 0, 0, name)


def checkpoint_ownership(reads_by_rank: Sequence[Mapping[str, Any]]) -> list[TensorOwnership]:
    """One :class:`TensorOwnership` per checkpoint tensor (in :func:`order_key` order). Pure.

    ``reads_by_rank[r]`` maps tensor names to objects with ``shape`` and ``reads`` (each read with
    ``ranges``: a ``(start, stop)`` per dimension). Raises ``ValueError`` if a rank read a tensor in
    pieces along two dimensions, which no TP weight loader does.
    """
    names = sorted({n for reads in reads_by_rank for n in reads}, key=order_key)
    out = []
    for name in names:
        shape = tuple(next(reads[name].shape for reads in reads_by_rank if name in reads))
        per_rank = [reads[name].reads if name in reads else [] for reads in reads_by_rank]
        partial = {d for reads in per_rank for read in reads for d, (a, b) in enumerate(read.ranges)
                   if (a, b) != (0, shape[d])}
        if len(partial) > 1:
            raise ValueError(f"{name}: reads are partial along several dimensions {sorted(partial)}")
        split_dim = partial.pop() if partial else None
        dim = split_dim or 0
        cuts = sorted({0, shape[dim]} | {x for reads in per_rank for read in reads for x in read.ranges[dim]})
        segments: list[Segment] = []
        for a, b in zip(cuts, cuts[1:]):
            ranks = tuple(r for r, reads in enumerate(per_rank)
                          if any(read.ranges[dim][0] <= a and b <= read.ranges[dim][1] for read in reads))
            if segments and segments[-1].ranks == ranks:
                segments[-1] = Segment(segments[-1].start, b, ranks)
            else:
                segments.append(Segment(a, b, ranks))
        out.append(TensorOwnership(name, shape, split_dim, tuple(segments)))
    return out


def bytes_read(reads_by_rank: Sequence[Mapping[str, Any]]) -> list[int]:
    """Bytes each rank read, over all tensors."""
    return [sum(read.nbytes for t in reads.values() for read in t.reads) for reads in reads_by_rank]


def short_name(name: str) -> str:
    return name.removeprefix("model.")


def _fmt_ranges(ranges: list[tuple[int, int]], own: TensorOwnership) -> str:
    if not ranges:
        return "-"
    if ranges == [(0, own.extent)]:
        return "all"
    return ", ".join(f"{a}-{b - 1}" for a, b in ranges)


# --------------------------------------------------------------------------- drawing
def plot_checkpoint_map(reads_by_rank: Sequence[Mapping[str, Any]], title: str = "", ax: Axes | None = None) -> Axes:
    """Every checkpoint tensor as a bar (its split dimension, scaled to the same length), each segment in
    the colour of the rank holding it; a segment held by several ranks is a stack of thin bars, one per
    copy."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    owners = checkpoint_ownership(reads_by_rank)
    tp = len(reads_by_rank)
    if ax is None:
        ax = Figure(figsize=(8, 0.6 + 0.24 * len(owners))).add_subplot()
    for y, own in enumerate(owners):
        for seg in own.segments:
            x0, width = seg.start / own.extent, (seg.stop - seg.start) / own.extent
            if not seg.ranks:
                ax.add_patch(Rectangle((x0, y - 0.4), width, 0.8, facecolor="white", edgecolor="grey", hatch="xx"))
                continue
            stripe = 0.8 / len(seg.ranks)  # copies are stacked, so the extent stays true
            for i, r in enumerate(seg.ranks):
                ax.add_patch(Rectangle((x0, y - 0.4 + i * stripe), width, stripe, facecolor=rank_color(r),
                                       edgecolor="none"))
            ax.add_patch(Rectangle((x0, y - 0.4), width, 0.8, fill=False, edgecolor="white", linewidth=0.8))
        copies = max(len(seg.ranks) for seg in own.segments)
        ax.text(1.01, y, own.split + (f" (x{copies})" if own.split_dim is not None and copies > 1 else ""),
                va="center", fontsize=7)
    layer_of = [order_key(o.name)[:2] for o in owners]
    for y in range(1, len(owners)):
        if layer_of[y] != layer_of[y - 1]:
            ax.axhline(y - 0.5, color="grey", linewidth=0.6)
    ax.set_yticks(range(len(owners)))
    ax.set_yticklabels([f"{short_name(o.name)} {list(o.shape)}" for o in owners], fontsize=7)
    ax.set_ylim(len(owners) - 0.5, -0.5)
    ax.set_xlim(0, 1)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1])
    ax.set_xticklabels(["0", "1/4", "1/2", "3/4", "all"], fontsize=7)
    ax.set_xlabel("fraction of the tensor along its split dimension (rows or columns of W)", fontsize=8)
    read = bytes_read(reads_by_rank)
    handles = [Patch(facecolor=rank_color(r), label=f"rank {r}: read {read[r] / 1024:,.1f} KiB") for r in range(tp)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.08, 1), frameon=False)
    ax.set_title(title or f"which rank read what, TP = {tp}", fontsize=9)
    return ax


def first_layer_table_html(reads_by_rank: Sequence[Mapping[str, Any]]) -> str:
    """The tensors outside the layers and those of layer 0, with the ranges each rank holds (an HTML table).

    Ends with a note saying whether every other layer is split exactly like layer 0.
    """
    owners = checkpoint_ownership(reads_by_rank)
    tp = len(reads_by_rank)
    by_layer: dict[int, list[tuple[str, tuple]]] = {}
    for o in owners:
        m = _LAYER.match(o.name)
        if m:
            by_layer.setdefault(int(m[1]), []).append((m[2], (o.shape, o.split_dim, o.segments)))
    same = all(v == by_layer[0] for v in by_layer.values()) if by_layer else True
    head = "".join(f'<th style="background:{rank_color(r)};color:{TEXT_COLOR};padding:0 0.5em">rank {r}</th>'
                   for r in range(tp))
    rows = []
    for o in owners:
        m = _LAYER.match(o.name)
        if m and m[1] != "0":
            continue
        cells = "".join(f'<td style="padding:0 0.5em">{_fmt_ranges(o.ranges_of(r), o)}</td>' for r in range(tp))
        rows.append(f'<tr><td style="padding:0 0.5em">{html.escape(short_name(o.name))}</td>'
                    f'<td style="padding:0 0.5em">{list(o.shape)}</td><td style="padding:0 0.5em">{o.split}</td>'
                    f"{cells}</tr>")
    layers = len(by_layer)
    others = "Layer 1 is" if layers == 2 else f"Layers 1-{layers - 1} are"
    note = ("" if layers <= 1 else f"{others} split exactly like layer 0." if same
            else "Some layers are split differently from layer 0.")
    return (f'<table class="hybridpar-model-shards" style="font-size:0.8em;border-collapse:collapse">'
            f'<tr><th style="text-align:left">tensor</th><th>shape</th><th>split</th>{head}</tr>'
            f'{"".join(rows)}</table><p style="font-size:0.8em">{note} A cell lists the rows or columns of the '
            f"checkpoint tensor that the rank read (all: the whole tensor; -: nothing).</p>")


def checkpoint_map_html(reads_by_rank: Sequence[Mapping[str, Any]], title: str = "", dpi: int = 80) -> str:
    """The figure as an inline PNG, followed by :func:`first_layer_table_html` (works offline, no kernel)."""
    ax = plot_checkpoint_map(reads_by_rank, title)
    fig = ax.figure
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    alt = title or f"checkpoint tensors split over {len(reads_by_rank)} ranks"
    return (f'<div class="hybridpar-model-shards"><img alt="{html.escape(alt)}" style="max-width:100%" '
            f'src="data:image/png;base64,{image}"/>{first_layer_table_html(reads_by_rank)}</div>')


def checkpoint_map_explorer(frames: Mapping[int, Sequence[Mapping[str, Any]]], model: str = "") -> ipywidgets.VBox:
    """One drawing per TP size (``frames[tp]`` = that run's ``reads_by_rank``), chosen by toggle buttons that
    are ``jslink``-ed to a ``Stack``: every view is computed now, so it works in the static book."""
    import ipywidgets as widgets

    sizes = list(frames)
    toggle = widgets.ToggleButtons(options=[str(t) for t in sizes], description="TP size",
                                   style={"description_width": "initial"})
    views = [widgets.HTML(checkpoint_map_html(frames[t], f"{model}: which rank read what, TP = {t}" if model else ""))
             for t in sizes]
    return widgets.VBox([toggle, linked_stacks([toggle], views)])
