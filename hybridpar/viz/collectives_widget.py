"""What each collective does to every rank's tensor: simulated, run for real, and drawn.

Three layers, checked against each other in ``tests/test_viz_collectives.py``:

* :func:`simulate` is a *pure* function: the semantics of each collective, written with Python
  lists on small integer tensors. No processes, no torch.
* :func:`trace_collectives` runs the *real* collectives of :mod:`hybridpar.distributed.communication_op`
  on ``world_size`` ranks (gloo on CPU, NCCL on GPUs) and returns each rank's tensor before and
  after. The test and the lab assert that it equals :func:`simulate`.
* :func:`frame_html`, :func:`collectives_widget` and :func:`collectives_explorer` draw a frame:
  one row per rank, its tensor before and after, every element coloured by the rank it came from
  (striped with all ranks' colours when it is a sum).

Inputs (:func:`example_inputs`): rank ``r`` holds ``base * r + 1, base * r + 2, ...`` (``base`` a
power of ten larger than the length), so every number says which rank it started on. Reductions
and ``scatter`` use ``chunk * world_size`` elements per rank, so the result splits evenly;
gathers use ``chunk``. The root of broadcast, scatter and gather is rank 0; ranks whose input a
collective never reads (non-roots of broadcast and scatter) have ``None`` as their "before".

ipywidgets is imported inside the widget functions, so importing this module stays cheap.
"""
from __future__ import annotations

import html
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from hybridpar.distributed import communication_op as comm
from hybridpar.distributed.launcher import current_device, launch
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel
from hybridpar.viz.colors import TEXT_COLOR, mixed_background, rank_color
from hybridpar.viz.static import linked_stacks

if TYPE_CHECKING:
    import ipywidgets

COLLECTIVES = ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "scatter", "gather")
ROOT = 0  # source of broadcast and scatter, destination of gather
WORLD_SIZES = (2, 3, 4)

# collective -> (what every rank holds afterwards, the torch.distributed call, where inference uses it)
DESCRIPTIONS: dict[str, tuple[str, str, str]] = {
    "all_reduce": ("every rank holds the element-wise sum of all ranks' tensors",
                   "dist.all_reduce", "after every row-parallel layer: the g operator"),
    "reduce_scatter": ("rank i holds chunk i of the sum",
                       "dist.reduce_scatter_tensor",
                       "sequence parallelism; the first half of a ring all-reduce"),
    "all_gather": ("every rank holds all ranks' tensors, concatenated in rank order",
                   "dist.all_gather_into_tensor (NCCL); dist.all_gather (gloo)",
                   "vocabulary-parallel logits; gather_output=True"),
    "broadcast": ("every rank holds the root's tensor", "dist.broadcast",
                  "the scheduler's decisions, sampled tokens"),
    "scatter": ("rank i holds chunk i of the root's tensor", "dist.scatter",
                "token parallelism: the root hands each rank its requests"),
    "gather": ("the root holds all ranks' tensors, concatenated; the others hold nothing", "dist.gather",
               "token parallelism: the root collects the attention outputs"),
}

Values = list[int] | None  # one rank's 1-D tensor as a list; None: no tensor (not read / not returned)


@dataclass(frozen=True)
class CollectiveFrame:
    """Every rank's tensor before and after one collective. Invariant: ``len(before) == len(after) == world_size``."""

    collective: str
    world_size: int
    before: list[Values]
    after: list[Values]


def _check(collective: str, world_size: int, chunk: int = 1) -> None:
    if collective not in COLLECTIVES:
        raise ValueError(f"unknown collective {collective!r}; choose one of {COLLECTIVES}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")


def input_length(collective: str, world_size: int, chunk: int = 2) -> int:
    """Elements per rank of the input: ``chunk`` for gathers and broadcast, ``chunk * world_size`` otherwise."""
    _check(collective, world_size, chunk)
    return chunk if collective in ("all_gather", "gather", "broadcast") else chunk * world_size


def example_inputs(collective: str, world_size: int, chunk: int = 2) -> list[Values]:
    """Each rank's input (``None`` where the collective never reads it). Pure."""
    n = input_length(collective, world_size, chunk)
    base = 10 ** len(str(n))
    inputs: list[Values] = [[base * r + i + 1 for i in range(n)] for r in range(world_size)]
    if collective in ("broadcast", "scatter"):
        inputs = [v if r == ROOT else None for r, v in enumerate(inputs)]
    return inputs


def simulate(collective: str, world_size: int, chunk: int = 2) -> CollectiveFrame:
    """Each rank's tensor before and after ``collective`` on :func:`example_inputs`. Pure: no processes."""
    before = example_inputs(collective, world_size, chunk)
    ranks = range(world_size)
    if collective in ("all_reduce", "reduce_scatter"):
        total = [sum(column) for column in zip(*before)]
        if collective == "all_reduce":
            after: list[Values] = [list(total) for _ in ranks]
        else:
            after = [total[r * chunk:(r + 1) * chunk] for r in ranks]
    elif collective in ("all_gather", "gather"):
        joined = [x for values in before for x in values]
        after = [list(joined) if collective == "all_gather" or r == ROOT else None for r in ranks]
    elif collective == "broadcast":
        after = [list(before[ROOT]) for _ in ranks]
    else:  # scatter
        after = [before[ROOT][r * chunk:(r + 1) * chunk] for r in ranks]
    return CollectiveFrame(collective, world_size, before, after)


def after_origins(collective: str, world_size: int, chunk: int = 2) -> list[list[int | None] | None]:
    """For every element of every rank's output: the rank it came from, or ``None`` for a sum of all ranks."""
    frame = simulate(collective, world_size, chunk)
    origins: list[list[int | None] | None] = []
    for values in frame.after:
        if values is None:
            origins.append(None)
        elif collective in ("all_reduce", "reduce_scatter"):
            origins.append([None] * len(values))
        elif collective in ("all_gather", "gather"):
            origins.append([i // chunk for i in range(len(values))])
        else:
            origins.append([ROOT] * len(values))
    return origins


# --------------------------------------------------------------------------- the real thing
def _trace_worker(collectives: Sequence[str], chunk: int) -> dict[str, tuple[list[Values], list[Values]]]:
    """Runs on every rank: apply each collective to this rank's example input; return (before, after)."""
    initialize_tensor_parallel(dist.get_world_size())
    group = get_tp_group()
    rank, device = group.rank_in_group, current_device()
    calls = {
        "all_reduce": lambda x: comm.all_reduce(x, group),
        "reduce_scatter": lambda x: comm.reduce_scatter(x, 0, group),
        "all_gather": lambda x: comm.all_gather(x, 0, group),
        "broadcast": lambda x: comm.broadcast(x, ROOT, group),
        "scatter": lambda x: comm.scatter(x, ROOT, 0, group),
        "gather": lambda x: comm.gather(x, ROOT, 0, group),
    }
    out = {}
    for name in collectives:
        mine = example_inputs(name, group.world_size, chunk)[rank]
        n = input_length(name, group.world_size, chunk)
        # a rank whose input is never read still passes a buffer of the right shape
        x = torch.tensor(mine if mine is not None else [0] * n, dtype=torch.int64, device=device)
        result = calls[name](x)
        out[name] = (mine, None if result is None else result.cpu().tolist())
    return out


def trace_collectives(
    world_size: int, collectives: Iterable[str] = COLLECTIVES, chunk: int = 2, backend: str = "gloo"
) -> dict[str, CollectiveFrame]:
    """Run the real collectives on ``world_size`` ranks (one launch); return a frame per collective.

    ``backend``: "gloo" (CPU), "nccl" (one GPU per rank) or "auto". Each rank returns its tensors;
    nothing is printed by the ranks.
    """
    names = list(collectives)
    for name in names:
        _check(name, world_size, chunk)
    per_rank = launch(_trace_worker, world_size, names, chunk, backend=backend)
    return {
        name: CollectiveFrame(name, world_size, [r[name][0] for r in per_rank], [r[name][1] for r in per_rank])
        for name in names
    }


# --------------------------------------------------------------------------- drawing
_CELL = (f"min-width:2.4em;padding:0.15em 0.35em;text-align:right;border:1px solid #777;"
         f"color:{TEXT_COLOR};font-family:monospace")


def _cells(values: Values, origins: Sequence[int | None] | None, world_size: int, note: str) -> str:
    if values is None:
        return f'<td style="padding:0.15em 0.5em;color:#888;font-style:italic">{note}</td>'
    parts = []
    for value, origin in zip(values, origins or [None] * len(values)):
        if origin is None:
            style, title = f"background:{mixed_background(range(world_size))};font-weight:bold", "sum over all ranks"
        else:
            style, title = f"background:{rank_color(origin)}", f"from rank {origin}"
        parts.append(f'<td style="{_CELL};{style}" title="{title}">{value}</td>')
    return "".join(parts)


def frame_html(frame: CollectiveFrame, chunk: int = 2, title: str | None = None) -> str:
    """An HTML table: one row per rank, its tensor before and after the collective, coloured by origin."""
    _check(frame.collective, frame.world_size, chunk)
    what, call, use = DESCRIPTIONS[frame.collective]
    origins = after_origins(frame.collective, frame.world_size, chunk)
    rows = []
    for r in range(frame.world_size):
        own = [r] * len(frame.before[r]) if frame.before[r] is not None else None
        before = _cells(frame.before[r], own, frame.world_size, "not read")
        after = _cells(frame.after[r], origins[r], frame.world_size, "None")
        rows.append(
            f'<tr><th style="padding-right:0.6em;text-align:left">rank {r}</th>'
            f'<td><table style="border-collapse:collapse"><tr>{before}</tr></table></td>'
            f'<td style="padding:0 0.6em">&rarr;</td>'
            f'<td><table style="border-collapse:collapse"><tr>{after}</tr></table></td></tr>'
        )
    caption = html.escape(title or f"{frame.collective} on {frame.world_size} ranks")
    return (
        f'<div class="hybridpar-collective"><div><b>{caption}</b>: {html.escape(what)}</div>'
        f'<table style="border-collapse:separate;border-spacing:0 0.2em">'
        f'<tr><th></th><th style="text-align:left">before</th><th></th><th style="text-align:left">after</th></tr>'
        f'{"".join(rows)}</table>'
        f'<div style="font-size:0.85em">call: <code style="color:inherit;background:none">{html.escape(call)}</code>; '
        f"used for: {html.escape(use)}. "
        f"Colour: the rank an element came from; stripes: a sum over all ranks.</div></div>"
    )


def collectives_widget(collective: str = "all_reduce", world_size: int = 4, max_world_size: int = 8) -> ipywidgets.VBox:
    """A dropdown for the collective and a slider for the world size; redraws :func:`simulate` in a
    Python callback (kernel-only: in the book, tag its cell ``remove-output``, or show
    :func:`collectives_explorer` over the same world sizes, which works everywhere)."""
    import ipywidgets as widgets

    _check(collective, world_size)
    style = {"description_width": "initial"}
    pick = widgets.Dropdown(options=list(COLLECTIVES), value=collective, description="collective", style=style)
    size = widgets.IntSlider(value=world_size, min=1, max=max_world_size, description="world size", style=style)
    out = widgets.HTML()

    def update(_change: object = None) -> None:
        out.value = frame_html(simulate(pick.value, size.value))

    pick.observe(update, names="value")
    size.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([pick, size]), out])


def collectives_explorer(
    world_sizes: Sequence[int] = WORLD_SIZES,
    collectives: Sequence[str] = COLLECTIVES,
    frames: Mapping[tuple[str, int], CollectiveFrame] | None = None,
    title: str = "",
    world_size: int | None = None,
) -> ipywidgets.VBox:
    """Precomputed frames for every (collective, world size), picked by a dropdown and a slider that are
    ``jslink``-ed to nested ``Stack`` widgets: it works in the static book, with no kernel.

    ``frames`` maps ``(collective, world_size)`` to a frame (e.g. from :func:`trace_collectives`);
    missing ones are simulated. ``title`` is prefixed to each frame's caption. ``world_size``: the
    one shown first (default: the smallest).
    """
    import ipywidgets as widgets

    frames = dict(frames or {})
    world_sizes = list(world_sizes)
    first = world_sizes[0] if world_size is None else world_size
    if first not in world_sizes:
        raise ValueError(f"world_size={first} is not one of world_sizes={world_sizes}")
    style = {"description_width": "initial"}
    pick = widgets.Dropdown(options=list(collectives), description="collective", style=style)
    size = widgets.SelectionSlider(options=[str(w) for w in world_sizes], value=str(first), description="world size",
                                   style=style)
    pages = [[widgets.HTML(frame_html(frames.get((name, w)) or simulate(name, w),
                                      title=f"{title}{name} on {w} ranks")) for w in world_sizes]
             for name in collectives]
    return widgets.VBox([widgets.HBox([pick, size]), linked_stacks([pick, size], pages)])
