"""The opening figure of each chapter: the whole mechanism in one picture, before any code.

Each function returns a matplotlib figure drawn from the package's own numbers where there are
numbers (:func:`decode_step_figure` from :func:`hybridpar.roofline.decode_step_time`,
:func:`ring_allreduce_figure` from :func:`ring_allreduce_steps`), so a picture cannot drift from
the code it introduces. Chapter 7's opening figure, drawn from measurements, is
:func:`hybridpar.viz.perf_plots.plot_step_ladder`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridpar.roofline import HardwareSpec, ModelShape, decode_step_time, format_bytes, format_seconds
from hybridpar.viz.colors import TEXT_COLOR, rank_color

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

COLUMN_COLOR = "#c6dbef"  # column-parallel layers (split output features)
ROW_COLOR = "#fdd0a2"  # row-parallel layers (split input features)
COMM_COLOR = "#fc9272"  # collectives
PLAIN_COLOR = "#eeeeee"  # replicated work


def _canvas(width: float, height: float, xmax: float, ymax: float) -> tuple[Figure, Axes]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, xmax)
    ax.set_ylim(0, ymax)
    ax.axis("off")
    return fig, ax


def _box(ax: Axes, x: float, y: float, w: float, h: float, text: str, color: str = PLAIN_COLOR,
         fontsize: float = 8.5, bold: bool = False) -> None:
    """A rounded box whose lower-left corner is ``(x, y)``, with centred text."""
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color,
                                ec="#555555", lw=1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=TEXT_COLOR,
            fontweight="bold" if bold else "normal")


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], text: str = "",
           color: str = "#444444", fontsize: float = 7.5) -> None:
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": color, "lw": 1.2})
    if text:
        ax.text((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.08, text, ha="center", va="bottom",
                fontsize=fontsize, color=color)


# ------------------------------------------------------------------ chapter 1: one decode step

def decode_step_figure(model: ModelShape, hardware: HardwareSpec, batch_size: int = 64,
                       context_len: int = 1024) -> Figure:
    """What one decode step moves and computes: bytes from HBM to the SMs against FLOPs, both as times."""
    step = decode_step_time(model, hardware, 1, batch_size, context_len)
    weights = step.bytes_read - step.kv_cache_bytes
    fig, ax = _canvas(9.0, 3.2, 10, 3.8)
    ax.text(5.0, 3.65, f"one decode step of {model.name}, batch {batch_size}, context {context_len}: "
            f"{step.bound}-bound", ha="center", va="top", fontsize=9.5, fontweight="bold")
    _box(ax, 0.2, 0.1, 2.6, 3.1, "", "#f7f7f7")
    ax.text(1.5, 3.1, f"HBM ({hardware.name})", ha="center", va="top", fontsize=9, fontweight="bold")
    scale = 2.5 / step.bytes_read
    w_h, kv_h = max(weights * scale, 0.45), max(step.kv_cache_bytes * scale, 0.45)
    _box(ax, 0.6, 0.2, 1.8, w_h, f"weights\n{format_bytes(weights)}", COLUMN_COLOR)
    _box(ax, 0.6, 0.25 + w_h, 1.8, kv_h, f"KV cache\n{format_bytes(step.kv_cache_bytes)}", ROW_COLOR)
    _box(ax, 6.7, 1.0, 3.0, 1.5, f"SMs (tensor cores)\n{step.flops / 1e12:.2f} TFLOP\n"
         f"= 2 x params x {batch_size} tokens", PLAIN_COLOR)
    _arrow(ax, (2.9, 1.75), (6.6, 1.75), f"read once: {format_bytes(step.bytes_read)} at "
           f"{hardware.memory_bandwidth / 1e12:.2f} TB/s = {format_seconds(step.memory_time)}", fontsize=8)
    ax.text(4.75, 1.3, f"compute at {hardware.peak_flops / 1e12:.0f} TFLOP/s = "
            f"{format_seconds(step.compute_time)}", ha="center", fontsize=8, color="#444444")
    return fig


# ------------------------------------------------------------------ chapter 2: ring all-reduce

@dataclass(frozen=True)
class RingStep:
    """One state of a ring all-reduce: ``holds[r][c]`` is the set of ranks summed into chunk ``c`` on
    rank ``r``; ``sent[r]`` is the chunk rank ``r`` sent to rank ``r + 1`` to get here (None at the start)."""

    label: str
    holds: tuple[tuple[frozenset[int], ...], ...]
    sent: tuple[int | None, ...]


def ring_allreduce_steps(n: int) -> list[RingStep]:
    """The start and the ``2 (n - 1)`` steps of a ring all-reduce of ``n`` chunks on ``n`` ranks.

    Reduce-scatter step ``s``: rank ``r`` sends chunk ``(r - s) % n`` right and the receiver adds
    it; after ``n - 1`` steps rank ``r`` holds the full sum of chunk ``(r + 1) % n``. All-gather
    step ``s``: rank ``r`` sends chunk ``(r + 1 - s) % n`` right and the receiver keeps it.
    """
    if n < 2:
        raise ValueError(f"a ring needs n >= 2 ranks, got {n}")
    holds = [[frozenset({r}) for _ in range(n)] for r in range(n)]
    steps = [RingStep("start", tuple(map(tuple, holds)), (None,) * n)]
    for phase in ("reduce-scatter", "all-gather"):
        for s in range(n - 1):
            sent = [(r - s) % n if phase == "reduce-scatter" else (r + 1 - s) % n for r in range(n)]
            new = [row[:] for row in holds]
            for r, c in enumerate(sent):
                dst = (r + 1) % n
                new[dst][c] = holds[dst][c] | holds[r][c] if phase == "reduce-scatter" else holds[r][c]
            holds = new
            steps.append(RingStep(f"{phase} {s + 1}", tuple(map(tuple, holds)), tuple(sent)))
    return steps


def ring_allreduce_figure(n: int = 4) -> Figure:
    """Every state of a ring all-reduce on ``n`` ranks: a row per step, a column per rank, ``n``
    chunks per rank striped with the colours of the ranks summed into them; the chunk each rank
    just sent to its right neighbour is outlined in red."""
    from matplotlib.patches import Rectangle

    steps = ring_allreduce_steps(n)
    cell, gap = 0.5, 0.6
    width = n * (n * cell + gap)
    fig, ax = _canvas(9.0, 0.42 * len(steps) + 0.9, width + 2.2, len(steps) + 0.9)
    for r in range(n):
        ax.text(2.2 + r * (n * cell + gap) + n * cell / 2, len(steps) + 0.35, f"rank {r}", ha="center",
                fontsize=9, fontweight="bold")
    for i, step in enumerate(steps):
        y = len(steps) - 1 - i
        ax.text(0.0, y + 0.45, step.label, va="center", fontsize=8)
        for r in range(n):
            x0 = 2.2 + r * (n * cell + gap)
            for c in range(n):
                ranks = sorted(step.holds[r][c])
                for j, src in enumerate(ranks):
                    ax.add_patch(Rectangle((x0 + c * cell + j * cell / len(ranks), y + 0.1), cell / len(ranks),
                                           0.7, fc=rank_color(src), ec="none"))
                full = len(ranks) == n
                ax.add_patch(Rectangle((x0 + c * cell, y + 0.1), cell, 0.7, fc="none",
                                       ec="#d62728" if step.sent[r] == c else "#555555",
                                       lw=2.2 if step.sent[r] == c else (1.4 if full else 0.6)))
                ax.text(x0 + c * cell + cell / 2, y + 0.45, "Σ" if full else str(len(ranks)), ha="center",
                        va="center", fontsize=7, color=TEXT_COLOR)
    ax.text(0.0, -0.35, f"{n} ranks, {n} chunks each; a digit: how many ranks' values the chunk sums, Σ: all. "
            f"Red: sent to the next rank (rank {n - 1} sends to rank 0). {2 * (n - 1)} steps.",
            fontsize=7.5, color="#444444")
    return fig


# ------------------------------------------------------------------ chapter 3: column then row

def column_row_figure(tp_size: int = 2) -> Figure:
    """An MLP split over ``tp_size`` ranks: f, a column-parallel layer, a row-parallel layer, g."""
    fig, ax = _canvas(9.0, 0.9 + 1.0 * tp_size, 10, 1.0 * tp_size + 0.9)
    mid = (tp_size * 1.0 + 0.4) / 2
    _box(ax, 0.0, mid - 0.3, 0.9, 0.6, "X\n[tokens, h]")
    _box(ax, 1.2, mid - 0.25, 0.5, 0.5, "f", COMM_COLOR, bold=True)
    _arrow(ax, (0.9, mid), (1.2, mid))
    for r in range(tp_size):
        y = tp_size - 1 - r + 0.45
        ax.text(2.0, y + 0.62, f"rank {r}", fontsize=7.5, color="#444444")
        _arrow(ax, (1.7, mid), (2.1, y + 0.25))
        _box(ax, 2.1, y, 2.2, 0.5, f"X A{r}: A's columns {r}/{tp_size}", COLUMN_COLOR)
        _arrow(ax, (4.3, y + 0.25), (4.6, y + 0.25))
        _box(ax, 4.6, y, 1.0, 0.5, f"Y{r} = σ(X A{r})", rank_color(r), fontsize=7.5)
        _arrow(ax, (5.6, y + 0.25), (5.9, y + 0.25))
        _box(ax, 5.9, y, 2.0, 0.5, f"Y{r} B{r}: B's rows {r}/{tp_size}", ROW_COLOR)
        _arrow(ax, (7.9, y + 0.25), (8.35, mid))
    _box(ax, 8.35, mid - 0.25, 0.5, 0.5, "g", COMM_COLOR, bold=True)
    _arrow(ax, (8.85, mid), (9.15, mid))
    _box(ax, 9.15, mid - 0.3, 0.8, 0.6, "Z =\nΣ Yr Br", PLAIN_COLOR, fontsize=7.5)
    ax.text(0.0, 0.0, "f: identity forward (all-reduce backward).  g: all-reduce forward (identity backward). "
            "No communication between the two layers.", fontsize=7.5, color="#444444")
    return fig


# ------------------------------------------------------------------ chapter 4: a decoder block

def decoder_block_figure(tp_size: int = 2) -> Figure:
    """One decoder layer under TP: attention half above, MLP half below, the two all-reduces in red."""
    fig, ax = _canvas(9.0, 3.0, 10, 3.3)
    rows = (("attention", 2.2, (("RMSNorm", PLAIN_COLOR), ("f", COMM_COLOR),
                                ("qkv_proj\ncolumn: heads/t", COLUMN_COLOR),
                                ("attention\nlocal heads, local KV", PLAIN_COLOR),
                                ("o_proj\nrow", ROW_COLOR), ("g: all-reduce 1", COMM_COLOR), ("+ residual", PLAIN_COLOR))),
            ("MLP", 0.8, (("RMSNorm", PLAIN_COLOR), ("f", COMM_COLOR),
                          ("gate_up_proj\ncolumn: I/t", COLUMN_COLOR), ("SwiGLU\nlocal", PLAIN_COLOR),
                          ("down_proj\nrow", ROW_COLOR), ("g: all-reduce 2", COMM_COLOR), ("+ residual", PLAIN_COLOR))))
    widths = (1.0, 0.4, 1.45, 1.6, 0.95, 1.35, 1.0)
    for name, y, boxes in rows:
        ax.text(0.0, y + 0.75, f"{name} half", fontsize=8.5, fontweight="bold")
        x = 0.0
        for (text, color), w in zip(boxes, widths):
            _box(ax, x, y, w, 0.6, text, color, fontsize=7.5, bold=text.startswith("g:"))
            if x > 0:
                _arrow(ax, (x - 0.25, y + 0.3), (x, y + 0.3))
            x += w + 0.25
    _arrow(ax, (9.4, 2.2), (0.5, 1.45))
    ax.text(0.0, 0.15, f"t = {tp_size}: each rank holds 1/t of the heads and of the MLP; the only communication is "
            "the two all-reduces (red), 2 per layer, 2L per step.", fontsize=7.5, color="#444444")
    return fig


# ------------------------------------------------------------------ chapter 5: a request's life

def request_life_figure() -> Figure:
    """A request through scheduler, radix tree and token pool, and back into the tree when it finishes."""
    fig, ax = _canvas(9.0, 3.2, 10, 3.4)
    _box(ax, 0.0, 2.3, 1.6, 0.8, "request\n(prompt tokens)")
    _box(ax, 2.0, 2.3, 2.2, 0.8, "scheduler\nwaiting queue,\nlongest prefix first", PLAIN_COLOR, fontsize=7.5)
    _box(ax, 4.6, 2.3, 2.4, 0.8, "radix tree: match prefix\ncached slots reused,\nlock_ref += 1 (protected)",
         COLUMN_COLOR, fontsize=7.5)
    _box(ax, 7.4, 2.3, 2.5, 0.8, "token pool: alloc slots\nfor the new tokens\n(evict unlocked leaves if full)",
         ROW_COLOR, fontsize=7.5)
    _box(ax, 7.4, 0.9, 2.5, 0.8, "prefill, then decode steps\nwrite K, V into the slots\n(req_to_token row)",
         PLAIN_COLOR, fontsize=7.5)
    _box(ax, 4.0, 0.9, 3.0, 0.8, "finished: insert its tokens\ninto the tree, lock_ref -= 1\n(evictable, still cached)",
         COLUMN_COLOR, fontsize=7.5)
    _box(ax, 0.6, 0.9, 3.0, 0.8, "next request with the\nsame prefix: a cache hit", PLAIN_COLOR, fontsize=7.5)
    for a, b in (((1.6, 2.7), (2.0, 2.7)), ((4.2, 2.7), (4.6, 2.7)), ((7.0, 2.7), (7.4, 2.7)),
                 ((8.65, 2.3), (8.65, 1.7)), ((7.4, 1.3), (7.0, 1.3)), ((4.0, 1.3), (3.6, 1.3))):
        _arrow(ax, a, b)
    ax.text(0.0, 0.3, "Under TP the leader rank decides every step (one scheduler, one tree) and sends the plan; "
            "every rank applies the same slots to its own KV heads.", fontsize=7.5, color="#444444")
    return fig


# ------------------------------------------------------------------ chapter 6: a TKNP pass

def tknp_pass_figure(tknp_size: int = 3) -> Figure:
    """One layer of a token-parallel pass: the root scatters Q, K, V by request, every rank attends with its
    own KV cache, the outputs are gathered back to the root."""
    k = tknp_size
    fig, ax = _canvas(9.0, 0.9 + 0.75 * k, 10, 0.75 * k + 0.9)
    mid = 0.75 * k / 2 + 0.3
    _box(ax, 0.0, mid - 0.45, 2.0, 0.9, "root: weights\nqkv_proj for\nthe whole batch", rank_color(0), fontsize=7.5)
    _box(ax, 2.4, mid - 0.3, 1.0, 0.6, "scatter\nby request", COMM_COLOR, fontsize=7.5)
    _arrow(ax, (2.0, mid), (2.4, mid))
    for r in range(k):
        y = 0.75 * (k - 1 - r) + 0.5
        _arrow(ax, (3.4, mid), (3.8, y + 0.25))
        role = "root" if r == 0 else "attention worker (no weights)"
        _box(ax, 3.8, y, 3.0, 0.5, f"rank {r}, {role}:\nattend its requests with its KV cache", rank_color(r),
             fontsize=7)
        _arrow(ax, (6.8, y + 0.25), (7.2, mid))
    _box(ax, 7.2, mid - 0.3, 0.9, 0.6, "gather", COMM_COLOR, fontsize=7.5)
    _arrow(ax, (8.1, mid), (8.4, mid))
    _box(ax, 8.4, mid - 0.45, 1.55, 0.9, "root: o_proj,\nMLP, next\nlayer", rank_color(0), fontsize=7.5)
    ax.text(0.0, 0.0, f"TKNP {k}: the KV cache is split by request over {k} ranks; per layer one scatter "
            "and one gather.", fontsize=7.5, color="#444444")
    return fig
