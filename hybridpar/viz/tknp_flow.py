"""One forward pass of token parallelism, stage by stage: who holds which request, and what moves.

:func:`step_flow` asks the package what happens in one pass of a TP ``t`` x TKNP ``k`` deployment,
so the pictures cannot drift from the code:

* **placement**: :func:`hybridpar.tknp.placement.place_all` on each request's reservation
  (prompt + ``max_new_tokens``, what the engine's
  :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` charges at admission), which is how it
  places requests that arrive in this order and are still running; each request takes the next
  free row of its rank's pool, as in the engine;
* **the pass**: every TKNP rank follows the scheduler's rule (TPScheduler's, per rank): a rank
  that holds newly arrived requests prefills them, and its running requests wait for the next
  pass; every other rank decodes all of its requests. One pass so mixes ranks that prefill with
  ranks that decode;
* **the split**: :func:`hybridpar.tknp.attention.split_batch` on the
  :class:`~hybridpar.tknp.attention.TknpForwardBatch` of the pass gives every rank's sub-batch, the
  split sizes of each ``scatterv`` / ``gatherv``, and the token order that groups tokens by rank;
* **heads**: :meth:`hybridpar.tknp.attention.AttentionGeometry.from_config` for every TP rank, the
  rule ``QKVParallelLinear`` uses.

:func:`flow_frames` turns a :class:`StepFlow` into one :class:`FlowFrame` per stage of
:data:`STAGES` (plan, QKV, scatter, attention, gather, the rest of the layer), :func:`frame_html`
draws one: a strip of the batch's tokens coloured by the TKNP rank that owns them, and one row per
global rank with what it holds and does. :func:`tknp_flow_explorer` (a list of layouts) and
:func:`tknp_layout_explorer` (a grid of TP x TKNP sizes) precompute every frame behind
``jslink``-ed controls (they work in the static book); :func:`tknp_flow_widget` recomputes in
Python callbacks (needs a live kernel). Byte counts are binary (KiB, MiB: :mod:`hybridpar.viz.units`).
:func:`engine_requests` builds the engine workload that reaches the same pass, so a real run can be
checked against the frames.

ipywidgets is imported inside the widget functions, so importing this module stays cheap.
"""
from __future__ import annotations

import html
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridpar.distributed.parallel_state import RankLayout, compute_layout
from hybridpar.models.sampling import SamplingParams
from hybridpar.roofline import MODEL_PRESETS, ModelShape
from hybridpar.tknp.attention import AttentionGeometry, TknpForwardBatch, split_batch
from hybridpar.tknp.placement import place_all
from hybridpar.viz.static import linked_stacks
from hybridpar.viz.tknp_frames import (  # noqa: F401  (the flow's API)
    STAGE_TITLES,
    STAGES,
    FlowFrame,
    RankRow,
    flow_frames,
    flow_html,
    frame_html,
)

if TYPE_CHECKING:
    import ipywidgets

    from hybridpar.tknp.attention import PassPlan
    from hybridpar.tknp.runner import Workload



@dataclass(frozen=True)
class FlowRequest:
    """A running request at the pass shown: ``prompt_len`` tokens, ``generated`` tokens sampled so far.

    ``generated == 0``: this pass is its prefill (all prompt tokens are new). Otherwise it decodes:
    one new token (the last sampled one) after ``prompt_len + generated - 1`` cached tokens.
    """

    prompt_len: int
    generated: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.generated < 0:
            raise ValueError(f"a request needs prompt_len >= 1 and generated >= 0, got {self}")

    @property
    def new_tokens(self) -> int:
        return self.prompt_len if self.generated == 0 else 1

    @property
    def cached_tokens(self) -> int:
        return 0 if self.generated == 0 else self.prompt_len + self.generated - 1

    @property
    def seq_len(self) -> int:
        """KV tokens of the request once this pass has written its new ones."""
        return self.cached_tokens + self.new_tokens


# Five requests in their 5th step of decoding, and a sixth that arrives now (its prefill): a mixed
# pass, so the ranks' pieces differ in size.
DEFAULT_REQUESTS = (FlowRequest(12, 4), FlowRequest(3, 4), FlowRequest(30, 4), FlowRequest(7, 4),
                    FlowRequest(20, 4), FlowRequest(5, 0))
DEFAULT_MAX_NEW_TOKENS = 8
LAYOUTS = ((1, 2), (2, 2), (1, 4))  # (tp, tknp) of the explorer


@dataclass(frozen=True)
class StepFlow:
    """Everything one TP ``t`` x TKNP ``k`` forward pass moves, from the package's own functions.

    Invariants: ``placement[i]`` is the TKNP rank of request ``i``; ``running`` lists the requests
    this pass runs, in batch order (the others wait on their rank); ``split_sizes[r]`` new tokens
    and ``kv_tokens[r]`` KV tokens belong to TKNP rank ``r`` (the same on every TP rank);
    ``order[j]`` is the batch index of the ``j``-th token once grouped by rank; ``heads[tp_rank]``
    is the attention geometry (query heads, KV heads) of that TP rank and of its whole TKNP group.
    """

    model: ModelShape
    tensor_parallel_size: int
    token_parallel_size: int
    requests: tuple[FlowRequest, ...]
    max_new_tokens: int
    reservations: tuple[int, ...]
    placement: tuple[int, ...]
    rows: tuple[int, ...]
    running: tuple[int, ...]
    plan: PassPlan  # split_batch's plan: one sub-batch per TKNP rank
    order: tuple[int, ...]
    heads: tuple[AttentionGeometry, ...]
    layout: RankLayout
    bytes_per_elem: int = 2

    @property
    def split_sizes(self) -> list[int]:
        return self.plan.split_sizes

    @property
    def num_tokens(self) -> int:
        return sum(self.split_sizes)

    @property
    def kv_tokens(self) -> list[int]:
        """KV tokens each TKNP rank attends over in this pass (its requests' ``seq_len``, summed)."""
        return [sum(p + n for p, n in zip(sb.prefix_lens, sb.extend_lens)) for sb in self.plan.sub_batches]

    def requests_on(self, tknp_rank: int) -> list[int]:
        """The requests whose KV this rank holds (running in this pass or waiting)."""
        return [i for i, r in enumerate(self.placement) if r == tknp_rank]

    def running_on(self, tknp_rank: int) -> list[int]:
        return [i for i in self.running if self.placement[i] == tknp_rank]

    @property
    def waiting(self) -> list[int]:
        """Requests that wait this pass: their rank prefills newly arrived requests first."""
        return [i for i in range(len(self.requests)) if i not in self.running]

    def token_requests(self, grouped: bool = False) -> list[int]:
        """The request of every new token, in batch order or (``grouped``) in rank-grouped order."""
        batch = [i for i in self.running for _ in range(self.requests[i].new_tokens)]
        return [batch[j] for j in self.order] if grouped else batch

    def scatter_bytes(self, tp_rank: int = 0) -> int:
        """Bytes a root sends per layer: packed q, k, v of every token it does not attend itself."""
        g = self.heads[tp_rank]
        return (self.num_tokens - self.split_sizes[0]) * g.packed_heads * g.head_dim * self.bytes_per_elem

    def gather_bytes(self, tp_rank: int = 0) -> int:
        """Bytes a root receives per layer: the attention outputs of the other ranks' tokens."""
        g = self.heads[tp_rank]
        return (self.num_tokens - self.split_sizes[0]) * g.num_heads * g.head_dim * self.bytes_per_elem

    def kv_read_bytes(self, tknp_rank: int, tp_rank: int = 0) -> int:
        """Bytes of K and V one rank reads per layer: its KV tokens x its KV heads."""
        g = self.heads[tp_rank]
        return self.kv_tokens[tknp_rank] * 2 * g.num_kv_heads * g.head_dim * self.bytes_per_elem

    @property
    def label(self) -> str:
        t, k = self.tensor_parallel_size, self.token_parallel_size
        return f"TP {t} x TKNP {k}" if t > 1 else f"TKNP {k}"


def step_flow(model: ModelShape | str = "tiny", tensor_parallel_size: int = 1, token_parallel_size: int = 2,
              requests: Sequence[FlowRequest] = DEFAULT_REQUESTS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
              bytes_per_elem: int = 2) -> StepFlow:
    """The engine's pass over ``requests`` (placed in this order, none finished yet): every rank
    prefills its newly arrived requests if it has any, else decodes all of its own.

    ``model``: a :class:`~hybridpar.roofline.ModelShape` or the name of a preset. Raises
    ``ValueError`` naming the fix for sizes the model or the layout cannot take.
    """
    shape = MODEL_PRESETS[model] if isinstance(model, str) else model
    t, k = tensor_parallel_size, token_parallel_size
    layout = compute_layout(t * k, tensor_parallel_size=t, token_parallel_size=k)
    requests = tuple(requests)
    if not requests:
        raise ValueError("a pass needs at least one request")
    if any(max_new_tokens <= r.generated for r in requests):
        raise ValueError(f"max_new_tokens={max_new_tokens} must exceed every request's generated tokens "
                         f"(a request with max_new_tokens generated has finished)")
    heads = tuple(AttentionGeometry.from_config(shape, t, r) for r in range(t))
    reservations = tuple(r.prompt_len + max_new_tokens for r in requests)  # TknpScheduler's charge at admission
    placement = tuple(place_all(list(reservations), k))
    rows = tuple(placement[:i].count(rank) for i, rank in enumerate(placement))  # the engine's next free row
    prefilling = {placement[i] for i, r in enumerate(requests) if r.generated == 0}
    running = tuple(i for i, r in enumerate(requests) if r.generated == 0 or placement[i] not in prefilling)
    fb = TknpForwardBatch.build_placed(None, [placement[i] for i in running], [rows[i] for i in running],
                                       [requests[i].cached_tokens for i in running],
                                       [requests[i].new_tokens for i in running])  # metadata only: no cache needed
    plan, order = split_batch(fb, k)
    return StepFlow(shape, t, k, requests, max_new_tokens, reservations, placement, rows, running, plan,
                    tuple(order.tolist()), heads, layout, bytes_per_elem)


def engine_requests(flow: StepFlow, vocab_size: int | None = None, seed: int = 0) -> tuple[Workload, int]:
    """A workload that brings the engine's scheduler (:class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`)
    to ``flow``'s pass.

    Returns the :class:`~hybridpar.tknp.runner.Workload` (random prompt ids, greedy, EOS ignored,
    ``flow.max_new_tokens`` each) and the scheduler step at which the pass happens: the requests
    that have generated ``S`` tokens arrive together at step 0 (prefilled at once, then one token
    per step), the others at step ``S``. Each request arrives at the step at which it is admitted,
    in the flow's order, so the scheduler places them exactly as :func:`step_flow` does.
    """
    from hybridpar.tknp.runner import Workload

    rng = random.Random(seed)
    vocab = vocab_size or flow.model.vocab_size
    step = max(r.generated for r in flow.requests)
    arrivals = [step - r.generated for r in flow.requests]
    if arrivals != sorted(arrivals):
        raise ValueError("list the requests in arrival order (most generated tokens first) so that the engine "
                         "admits them in the flow's order")
    if any(0 < r.generated < step for r in flow.requests):
        raise ValueError("the engine reaches a pass only when every running request arrived at the same step (a "
                         "later arrival would make the requests of its rank wait a step): give every request "
                         "either the same number of generated tokens or 0 (it arrives now)")
    params = SamplingParams(max_new_tokens=flow.max_new_tokens, ignore_eos=True)
    prompts = [[rng.randrange(vocab) for _ in range(r.prompt_len)] for r in flow.requests]
    return Workload("flow", prompts, [params] * len(prompts), arrivals), step


def tknp_flow_explorer(flows: Sequence[StepFlow] | None = None) -> ipywidgets.VBox:
    """Every stage of every flow drawn in advance; a layout dropdown and a stage slider are ``jslink``-ed
    to nested ``Stack`` widgets, so it works in the static book, with no kernel.

    Default flows: the tiny model's :data:`DEFAULT_REQUESTS` under each of :data:`LAYOUTS`. (No
    ``Play`` button: in the book, the theme's Font Awesome script swaps the button's icon element
    for an SVG, the Play view then throws on every value change, and the exception stops the
    slider's other links.)
    """
    import ipywidgets as widgets

    flows = list(flows) if flows is not None else [step_flow("tiny", t, k) for t, k in LAYOUTS]
    style = {"description_width": "initial"}
    pick = widgets.Dropdown(options=[f.label for f in flows], description="layout", style=style)
    slider = widgets.IntSlider(value=0, min=0, max=len(STAGES) - 1, description="stage", style=style)
    frames = [[widgets.HTML(frame_html(flow, f)) for f in flow_frames(flow)] for flow in flows]
    return widgets.VBox([widgets.HBox([pick, slider]), linked_stacks([pick, slider], frames)])


def layout_frames_html(model: ModelShape | str, tensor_parallel_size: int, token_parallel_size: int,
                       requests: Sequence[FlowRequest], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> list[str]:
    """The HTML of every stage of one layout's pass, or, for a layout the model cannot take, one
    message per stage that says why."""
    try:
        flow = step_flow(model, tensor_parallel_size, token_parallel_size, requests, max_new_tokens)
    except ValueError as err:
        t, k = tensor_parallel_size, token_parallel_size
        return [f'<div class="hybridpar-tknp-flow"><p><b>TP {t} x TKNP {k}, {html.escape(STAGE_TITLES[stage])}:'
                f'</b> not a valid layout. {html.escape(str(err))}</p></div>' for stage in STAGES]
    return [frame_html(flow, f) for f in flow_frames(flow)]


def tknp_layout_explorer(model: str = "tiny", requests: Sequence[FlowRequest] = DEFAULT_REQUESTS,
                         tp_sizes: Sequence[int] = (1, 2, 4), tknp_sizes: Sequence[int] = (1, 2, 3, 4),
                         tensor_parallel_size: int = 1, token_parallel_size: int = 2,
                         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> ipywidgets.VBox:
    """TP and TKNP toggle buttons and a stage slider over one batch: every (TP, TKNP, stage) is drawn
    in advance and picked through ``jslink``-ed stacks, so every control works in the static book.

    The static twin of :func:`tknp_flow_widget`: the model and the batch are arguments (call again for
    others, e.g. with :func:`random_requests`); ``tensor_parallel_size`` and ``token_parallel_size``
    are the layout shown first.
    """
    import ipywidgets as widgets

    if tensor_parallel_size not in tp_sizes or token_parallel_size not in tknp_sizes:
        raise ValueError(f"the first layout TP {tensor_parallel_size} x TKNP {token_parallel_size} must be one of "
                         f"tp_sizes={tuple(tp_sizes)} x tknp_sizes={tuple(tknp_sizes)}")
    requests = tuple(requests)
    style = {"description_width": "initial"}
    buttons = {"description_width": "initial", "button_width": "3em"}
    tp_w = widgets.ToggleButtons(options=[str(t) for t in tp_sizes], value=str(tensor_parallel_size),
                                 description="TP", style=buttons)
    tknp_w = widgets.ToggleButtons(options=[str(k) for k in tknp_sizes], value=str(token_parallel_size),
                                   description="TKNP", style=buttons)
    stage_w = widgets.SelectionSlider(options=list(STAGES), value=STAGES[0], description="stage", style=style)
    frames = [[[widgets.HTML(text) for text in layout_frames_html(model, t, k, requests, max_new_tokens)]
               for k in tknp_sizes] for t in tp_sizes]
    stacks = linked_stacks([tp_w, tknp_w, stage_w], frames)
    return widgets.VBox([widgets.HBox([tp_w, tknp_w]), stage_w, stacks])


def random_requests(num_requests: int, seed: int = 0, max_prompt: int = 32, decode_steps: int = 4,
                    new_every: int = 3) -> tuple[FlowRequest, ...]:
    """``num_requests`` requests with random prompt lengths; every ``new_every``-th arrives in this pass
    (prefill), the others decode their ``decode_steps``-th token. Deterministic for a seed."""
    rng = random.Random(seed)
    reqs = [FlowRequest(rng.randint(1, max_prompt), 0 if (i + 1) % new_every == 0 else decode_steps)
            for i in range(num_requests)]
    return tuple(sorted(reqs, key=lambda r: -r.generated))  # arrival order: the oldest first


def tknp_flow_widget(model: str = "tiny", tensor_parallel_size: int = 1, token_parallel_size: int = 2,
                     num_requests: int = 6, seed: int = 0) -> ipywidgets.VBox:
    """Controls for the model, TP and TKNP sizes, the batch (size and seed) and the stage; redraws in a
    Python callback (kernel-only: in the book, tag its cell ``remove-output``;
    :func:`tknp_layout_explorer` is its static twin)."""
    import ipywidgets as widgets

    style = {"description_width": "initial"}
    model_w = widgets.Dropdown(options=sorted(MODEL_PRESETS), value=model, description="model", style=style)
    tp_w = widgets.ToggleButtons(options=[1, 2, 4], value=tensor_parallel_size, description="TP", style=style)
    tknp_w = widgets.ToggleButtons(options=[1, 2, 3, 4], value=token_parallel_size, description="TKNP", style=style)
    n_w = widgets.IntSlider(value=num_requests, min=1, max=12, description="requests", style=style)
    seed_w = widgets.IntSlider(value=seed, min=0, max=20, description="seed", style=style)
    stage_w = widgets.SelectionSlider(options=list(STAGES), value=STAGES[0], description="stage", style=style)
    out = widgets.HTML()

    def update(_change: object = None) -> None:
        try:
            flow = step_flow(model_w.value, tp_w.value, tknp_w.value, random_requests(n_w.value, seed_w.value))
        except ValueError as err:
            out.value = f"<p><b>Not a valid setting:</b> {html.escape(str(err))}</p>"
            return
        out.value = flow_html(flow, stage_w.value)

    for control in (model_w, tp_w, tknp_w, n_w, seed_w, stage_w):
        control.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([model_w, tp_w, tknp_w]), widgets.HBox([n_w, seed_w]), stage_w, out])
