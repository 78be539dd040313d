"""Which tensor-parallel rank holds which block of a weight: computed, drawn, and explored.

:func:`shard_map` is pure: from a layer kind, a TP size and a model shape it lists the blocks of the
layer's checkpoint tensor and the ranks that hold each one. It asks the layers themselves where
things go (``divide``, :func:`~hybridpar.layers.linear.qkv_partition`,
:func:`~hybridpar.layers.vocab_parallel_embedding.vocab_shard`), so the picture cannot drift from the
code; ``tests/test_shard_viewer.py`` checks it against the shards the real layers load on 2 and 4 ranks.

==========  ==========================  ===============================================
kind        checkpoint tensor           split
==========  ==========================  ===============================================
column      ``mlp.up_proj.weight``      output features (rows of ``W``)
row         ``mlp.down_proj.weight``    input features (columns of ``W``)
qkv         ``q/k/v_proj.weight``       by head; KV heads replicated when tp > KV heads
vocab       ``embed_tokens.weight``     vocabulary rows, padded to a multiple of 64 * tp
==========  ==========================  ===============================================

The drawing (:func:`plot_shard_map`) shows a linear layer as ``A = W^T`` (input features down,
output features across), the way ``y = x A`` and the Megatron-LM paper draw it: a column-parallel
layer then splits *columns*, a row-parallel layer *rows*. The embedding is drawn as stored,
one row per token id. Replicated blocks are striped with the colours of all their ranks; padding
rows are hatched.

matplotlib and ipywidgets are imported inside the functions that draw, so importing this module
stays cheap.
"""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridpar.layers.linear import divide, qkv_partition
from hybridpar.layers.vocab_parallel_embedding import vocab_shard
from hybridpar.roofline import MODEL_PRESETS, ModelShape
from hybridpar.viz.colors import TEXT_COLOR, rank_color
from hybridpar.viz.static import linked_stacks

if TYPE_CHECKING:
    import ipywidgets
    from matplotlib.axes import Axes

LAYER_KINDS = ("column", "row", "qkv", "vocab")
TP_SIZES = (1, 2, 4, 8)
# Small enough to see every head, with GQA: 8 query heads share 2 KV heads, so TP 4 and 8 replicate them.
EXAMPLE_MODEL = ModelShape(
    name="gqa-example", hidden_size=512, intermediate_size=1536, num_layers=1, num_heads=8,
    num_kv_heads=2, head_dim=64, vocab_size=1000,
)


@dataclass(frozen=True)
class Block:
    """A rectangle of the checkpoint tensor, ``[rows[0], rows[1]) x [cols[0], cols[1])``, and who holds it.

    ``ranks`` has several entries when the block is replicated. ``padding`` blocks lie past the end of
    the checkpoint tensor (vocabulary padding): the rank allocates them, but they hold zeros.
    """

    rows: tuple[int, int]
    cols: tuple[int, int]
    ranks: tuple[int, ...]
    label: str
    padding: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows[1] - self.rows[0], self.cols[1] - self.cols[0])


@dataclass(frozen=True)
class ShardMap:
    """The blocks of one layer's weight and their ranks, for one TP size.

    Invariants: the blocks tile ``[0, padded_rows) x [0, shape[1])``; the blocks a rank holds, in
    list order and concatenated along ``split_dim``, are exactly that rank's local weight.
    """

    kind: str
    tp_size: int
    model: ModelShape
    tensor: str
    shape: tuple[int, int]  # of the checkpoint tensor (rows, cols)
    split_dim: int  # dimension of the checkpoint tensor along which ranks' blocks are concatenated
    blocks: tuple[Block, ...]

    @property
    def padded_rows(self) -> int:
        return max(b.rows[1] for b in self.blocks)

    def blocks_of(self, rank: int) -> list[Block]:
        """The blocks ``rank`` holds, in the order of its local weight."""
        if not 0 <= rank < self.tp_size:
            raise ValueError(f"rank {rank} is outside [0, tp_size={self.tp_size})")
        return [b for b in self.blocks if rank in b.ranks]

    def local_shape(self, rank: int) -> tuple[int, int]:
        """Shape of ``rank``'s local weight."""
        shapes = [b.shape for b in self.blocks_of(rank)]
        if self.split_dim == 0:
            return (sum(s[0] for s in shapes), shapes[0][1])
        return (shapes[0][0], sum(s[1] for s in shapes))


def _head_blocks(section: str, offset: int, num_heads: int, head_dim: int, hidden: int,
                 owners: dict[int, list[int]]) -> list[Block]:
    return [
        Block((offset + h * head_dim, offset + (h + 1) * head_dim), (0, hidden), tuple(owners[h]),
              f"{section} head {h}")
        for h in range(num_heads)
    ]


def shard_map(kind: str, tp_size: int, model: ModelShape = EXAMPLE_MODEL, padding_size: int = 64) -> ShardMap:
    """Which rank holds each block of ``kind``'s weight at ``tp_size``. Pure: no process group.

    Raises ``ValueError`` (:class:`~hybridpar.config.ParallelConfigError` for a TP size that does not fit
    the model, naming the sizes that do).
    """
    if kind not in LAYER_KINDS:
        raise ValueError(f"unknown layer kind {kind!r}; choose one of {LAYER_KINDS}")
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be an int >= 1, got {tp_size!r}")
    hidden, inter = model.hidden_size, model.intermediate_size
    ranks = range(tp_size)
    if kind == "column":
        n = divide(inter, tp_size, "intermediate_size")
        blocks = [Block((r * n, (r + 1) * n), (0, hidden), (r,), f"output features {r * n}-{(r + 1) * n - 1}")
                  for r in ranks]
        return ShardMap(kind, tp_size, model, "mlp.up_proj.weight", (inter, hidden), 0, tuple(blocks))
    if kind == "row":
        k = divide(inter, tp_size, "intermediate_size")
        blocks = [Block((0, hidden), (r * k, (r + 1) * k), (r,), f"input features {r * k}-{(r + 1) * k - 1}")
                  for r in ranks]
        return ShardMap(kind, tp_size, model, "mlp.down_proj.weight", (hidden, inter), 1, tuple(blocks))
    if kind == "qkv":
        parts = [qkv_partition(model.num_heads, model.num_kv_heads, tp_size, r) for r in ranks]
        q_owners = {h: [r for r, p in enumerate(parts) if p.q_head_start <= h < p.q_head_start + p.num_heads]
                    for h in range(model.num_heads)}
        kv_owners = {h: [r for r, p in enumerate(parts) if p.kv_head_start <= h < p.kv_head_start + p.num_kv_heads]
                     for h in range(model.num_kv_heads)}
        d, q_rows, kv_rows = model.head_dim, model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
        blocks = (_head_blocks("q", 0, model.num_heads, d, hidden, q_owners)
                  + _head_blocks("k", q_rows, model.num_kv_heads, d, hidden, kv_owners)
                  + _head_blocks("v", q_rows + kv_rows, model.num_kv_heads, d, hidden, kv_owners))
        return ShardMap(kind, tp_size, model, "self_attn.{q,k,v}_proj.weight (stacked)",
                        (q_rows + 2 * kv_rows, hidden), 0, tuple(blocks))
    blocks = []
    for r in ranks:
        s = vocab_shard(model.vocab_size, r, tp_size, padding_size)
        if s.num_org_rows:
            blocks.append(Block((s.start, s.org_end), (0, hidden), (r,), f"token ids {s.start}-{s.org_end - 1}"))
        if s.org_end < s.end:
            blocks.append(Block((s.org_end, s.end), (0, hidden), (r,), f"padding rows {s.org_end}-{s.end - 1}", True))
    return ShardMap(kind, tp_size, model, "embed_tokens.weight", (model.vocab_size, hidden), 0, tuple(blocks))


def describe(smap: ShardMap, rank: int) -> str:
    """What ``rank`` holds, in words: runs of heads merged ("q heads 0-3"), and the ranks that share
    a replicated block named."""
    runs: list[tuple[str, int, int, tuple[int, ...]]] = []  # (label stem, first, last, sharing ranks)
    for b in smap.blocks_of(rank):
        stem, _, number = b.label.rpartition(" ")
        shared = tuple(r for r in b.ranks if r != rank)
        if stem.endswith("head") and runs and runs[-1][0] == stem and runs[-1][2] == int(number) - 1 \
                and runs[-1][3] == shared:
            runs[-1] = (stem, runs[-1][1], int(number), shared)
        elif stem.endswith("head"):
            runs.append((stem, int(number), int(number), shared))
        else:
            runs.append((b.label, -1, -1, shared))
    parts = []
    for stem, first, last, shared in runs:
        text = stem if first < 0 else (f"{stem} {first}" if first == last else f"{stem}s {first}-{last}")
        if shared:
            text += f" (also on rank{'s' if len(shared) > 1 else ''} {', '.join(map(str, shared))})"
        parts.append(text)
    return "; ".join(parts)


# --------------------------------------------------------------------------- drawing
def _axis_titles(smap: ShardMap) -> tuple[str, str]:
    """(x label, y label) of the drawing."""
    if smap.kind == "vocab":
        return "hidden features", "token id (row of the embedding table)"
    if smap.kind == "row":
        return "output features (hidden)", "input features (intermediate)"
    if smap.kind == "column":
        return "output features (intermediate)", "input features (hidden)"
    return "output features: q heads | k heads | v heads", "input features (hidden)"


def _xy(smap: ShardMap, block: Block) -> tuple[tuple[int, int], tuple[int, int]]:
    """(x range, y range) of a block in the drawing: linear layers are drawn transposed (A = W^T)."""
    return (block.cols, block.rows) if smap.kind == "vocab" else (block.rows, block.cols)


def model_caption(model: ModelShape) -> str:
    return (f"{model.name}: hidden {model.hidden_size}, heads {model.num_heads}, KV heads {model.num_kv_heads}, "
            f"head_dim {model.head_dim}, intermediate {model.intermediate_size}, vocab {model.vocab_size}")


def plot_shard_map(smap: ShardMap, ax: Axes | None = None) -> Axes:
    """Draw the weight with every block in its rank's colour (replicated: striped; padding: hatched)."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    if ax is None:
        ax = Figure(figsize=(7, 3.8)).add_subplot()
    for block in smap.blocks:
        (x0, x1), (y0, y1) = _xy(smap, block)
        width = (x1 - x0) / len(block.ranks)
        for i, r in enumerate(block.ranks):  # one stripe per rank holding a copy
            ax.add_patch(Rectangle((x0 + i * width, y0), width, y1 - y0, facecolor=rank_color(r), edgecolor="none",
                                   hatch="xx" if block.padding else ("//" if len(block.ranks) > 1 else None)))
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", linewidth=0.8))
    x_end, y_end = (smap.shape[1], smap.padded_rows) if smap.kind == "vocab" else smap.shape
    ax.set_xlim(0, x_end)
    ax.set_ylim(y_end, 0)  # matrix style: row 0 at the top
    if smap.kind == "vocab" and smap.padded_rows > smap.shape[0]:
        ax.axhline(smap.shape[0], color="black", linestyle="--", linewidth=1)
    if smap.kind == "qkv":
        m = smap.model
        q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
        ax.set_xticks([0, q, q + kv, q + 2 * kv])
        for center, name in ((q / 2, "q"), (q + kv / 2, "k"), (q + 1.5 * kv, "v")):
            ax.text(center, -0.02 * smap.shape[1], name, ha="center", va="bottom", fontsize=10, fontweight="bold")
    xlabel, ylabel = _axis_titles(smap)
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    handles = [Patch(facecolor=rank_color(r), label=f"rank {r}: {'x'.join(map(str, smap.local_shape(r)))}")
               for r in range(smap.tp_size)]
    if any(len(b.ranks) > 1 for b in smap.blocks):
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="//", label="replicated"))
    if any(b.padding for b in smap.blocks):
        handles.append(Patch(facecolor="white", edgecolor="grey", hatch="xx", label="padding (zeros)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="local weight",
              title_fontsize=7, frameon=False)
    ax.set_title(f"{smap.kind}-parallel {smap.tensor} [{smap.shape[0]} x {smap.shape[1]}], TP = {smap.tp_size}\n"
                 f"{model_caption(smap.model)}", fontsize=8, pad=18 if smap.kind == "qkv" else 6)
    return ax


def shard_map_html(smap: ShardMap, dpi: int = 80) -> str:
    """The drawing as an inline PNG, and a table of what every rank holds (works offline, no kernel)."""
    ax = plot_shard_map(smap)
    fig = ax.figure
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    image = base64.b64encode(buffer.getvalue()).decode("ascii")
    rows = "".join(
        f'<tr><td style="background:{rank_color(r)};color:{TEXT_COLOR};padding:0 0.5em;white-space:nowrap">'
        f'rank {r}</td><td style="padding:0 0.5em">{"x".join(map(str, smap.local_shape(r)))}</td>'
        f'<td style="padding:0 0.5em">{html.escape(describe(smap, r))}</td></tr>'
        for r in range(smap.tp_size)
    )
    alt = f"{smap.kind}-parallel {smap.tensor} split over {smap.tp_size} ranks"
    return (f'<div class="hybridpar-shards"><img alt="{html.escape(alt)}" style="max-width:100%" '
            f'src="data:image/png;base64,{image}"/>'
            f'<table style="font-size:0.85em;border-collapse:collapse"><tr><th>rank</th>'
            f'<th style="white-space:nowrap">local weight</th>'
            f'<th style="text-align:left">holds</th></tr>{rows}</table></div>')


def _frame_html(kind: str, tp_size: int, model: ModelShape) -> str:
    try:
        return shard_map_html(shard_map(kind, tp_size, model))
    except ValueError as err:  # a TP size that does not fit: say why and what would
        return f"<p><b>{html.escape(kind)} at TP = {tp_size}:</b> {html.escape(str(err))}</p>"


MODELS: dict[str, ModelShape] = {EXAMPLE_MODEL.name: EXAMPLE_MODEL, **MODEL_PRESETS}


def shard_viewer(model: str = EXAMPLE_MODEL.name, kind: str = "qkv", tp_size: int = 4,
                 tp_sizes: Sequence[int] = TP_SIZES) -> ipywidgets.VBox:
    """Dropdowns for the model, the layer kind and the TP size; redraws in a Python callback (kernel-only:
    in the book, tag its cell ``remove-output``; :func:`shard_explorer` is its static twin). Model: a
    name in :data:`MODELS`."""
    import ipywidgets as widgets

    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
    style = {"description_width": "initial"}
    model_w = widgets.Dropdown(options=list(MODELS), value=model, description="model", style=style)
    kind_w = widgets.Dropdown(options=list(LAYER_KINDS), value=kind, description="layer", style=style)
    tp_w = widgets.ToggleButtons(options=list(tp_sizes), value=tp_size, description="TP size", style=style)
    out = widgets.HTML()

    def update(_change: object = None) -> None:
        out.value = _frame_html(kind_w.value, tp_w.value, MODELS[model_w.value])

    for control in (model_w, kind_w, tp_w):
        control.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([model_w, kind_w]), tp_w, out])


def shard_explorer(model: ModelShape = EXAMPLE_MODEL, kinds: Sequence[str] = LAYER_KINDS,
                   tp_sizes: Sequence[int] = TP_SIZES) -> ipywidgets.VBox:
    """Every (layer kind, TP size) drawn in advance; a dropdown and toggle buttons ``jslink``-ed to
    nested ``Stack`` widgets pick one, so it works in the static book with no kernel."""
    import ipywidgets as widgets

    style = {"description_width": "initial"}
    kind_w = widgets.Dropdown(options=list(kinds), description="layer", style=style)
    tp_w = widgets.ToggleButtons(options=[str(t) for t in tp_sizes], description="TP size", style=style)
    frames = [[widgets.HTML(_frame_html(kind, t, model)) for t in tp_sizes] for kind in kinds]
    return widgets.VBox([widgets.HBox([kind_w]), tp_w, linked_stacks([kind_w, tp_w], frames)])
