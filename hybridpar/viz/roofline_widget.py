"""Chapter 1's decode calculator, as a live ipywidget and as a static, precomputed explorer.

* :func:`roofline_calculator` recomputes :func:`hybridpar.roofline.decode_step_time` in a Python
  callback whenever a control moves. It needs a live kernel (Jupyter, Colab): in the book its cell
  is tagged ``remove-output`` (see :mod:`hybridpar.viz.static`).
* :func:`roofline_explorer` precomputes every (TP size, batch) setting into a ``Stack`` of HTML
  tables and ``jslink``-s two sliders to the stack indices, so it keeps working in the static
  book, with no kernel.

ipywidgets is imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hybridpar.roofline import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    DecodeStep,
    HardwareSpec,
    ModelShape,
    allreduce_bytes_per_token,
    decode_step_time,
    format_seconds,
    kv_bytes_per_token,
)
from hybridpar.viz.static import linked_stacks
from hybridpar.viz.units import format_binary

if TYPE_CHECKING:
    import ipywidgets

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONTEXT_LENS = (0, 256, 1024, 4096, 16384, 32768)
TP_SIZES = (1, 2, 4, 8)


def step_rows(model: ModelShape, hardware: HardwareSpec, step: DecodeStep) -> list[tuple[str, str]]:
    """(label, value) rows describing one decode step on one TP rank."""
    t = step.tp_size
    return [
        ("weights per rank", format_binary(step.weight_bytes)),
        ("KV cache per token per rank", format_binary(kv_bytes_per_token(model, t))),
        ("KV cache per rank (batch x context)", format_binary(step.kv_cache_bytes)),
        ("fits in device memory", "yes" if step.fits else f"no (> {format_binary(hardware.memory_capacity)})"),
        ("all-reduce payload per token", format_binary(allreduce_bytes_per_token(model)) if t > 1 else "0 (no TP)"),
        ("bytes sent per rank per step", format_binary(step.comm_bytes)),
        ("memory time", format_seconds(step.memory_time)),
        ("compute time", format_seconds(step.compute_time)),
        ("communication time", format_seconds(step.comm_time)),
        ("step time (estimate)", f"<b>{format_seconds(step.step_time)}</b> ({step.bound}-bound)"),
        ("arithmetic intensity", f"{step.arithmetic_intensity:.3g} FLOP/B (ridge {hardware.ridge_intensity:.0f})"),
        ("throughput", f"{step.tokens_per_second:,.0f} tokens/s"),
    ]


def html_table(rows: Sequence[Sequence[object]], caption: str, header: Sequence[str] = (),
               compact: bool = False) -> str:
    """A small HTML table in the book's style (``table.hybridpar-roofline`` in ``_assets/hybridpar.css``)."""
    head = "<tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    cls = "hybridpar-roofline compact" if compact else "hybridpar-roofline"
    return f'<table class="{cls}"><caption>{caption}</caption>{head}{body}</table>'


def step_table_html(model: ModelShape, hardware: HardwareSpec, step: DecodeStep) -> str:
    """An HTML table of :func:`step_rows`, titled with the setting."""
    title = (
        f"{model.name} on {step.tp_size} x {hardware.name}, batch {step.batch_size}, "
        f"context {step.context_len}"
    )
    return html_table(step_rows(model, hardware, step), title)


def comparison_table_html(
    model: ModelShape,
    hardware: HardwareSpec,
    tp_sizes: Sequence[int],
    batch_sizes: Sequence[int],
    context_len: int,
) -> str:
    """A static HTML table: one row per (TP size, batch) with the main results of :func:`decode_step_time`.

    Step times are memory-bound unless marked.
    """
    header = ("TP", "batch", "weights/rank", "KV/rank", "fits", "memory", "compute", "comm", "step", "tokens/s")
    rows = []
    for t in tp_sizes:
        for b in batch_sizes:
            s = decode_step_time(model, hardware, t, b, context_len)
            step = format_seconds(s.step_time) + ("" if s.bound == "memory" else " (compute-bound)")
            rows.append((t, b, format_binary(s.weight_bytes), format_binary(s.kv_cache_bytes), "yes" if s.fits else "no",
                         format_seconds(s.memory_time), format_seconds(s.compute_time), format_seconds(s.comm_time),
                         f"<b>{step}</b>", f"{s.tokens_per_second:,.0f}"))
    caption = f"{model.name} on {hardware.name}, context {context_len} tokens per request"
    return html_table(rows, caption, header, compact=True)


def roofline_calculator(
    model: str = "llama-7b",
    hardware: str = "h100",
    tp_size: int = 1,
    batch_size: int = 1,
    context_len: int = 1024,
) -> ipywidgets.VBox:
    """Controls for model, hardware, TP size, batch and context; the table updates in a Python callback
    (kernel-only: in the book, tag its cell ``remove-output``; :func:`roofline_explorer` is its static twin)."""
    import ipywidgets as widgets

    style = {"description_width": "initial"}
    model_w = widgets.Dropdown(options=sorted(MODEL_PRESETS), value=model, description="model", style=style)
    hw_w = widgets.Dropdown(options=sorted(HARDWARE_PRESETS), value=hardware, description="hardware", style=style)
    tp_w = widgets.ToggleButtons(options=list(TP_SIZES), value=tp_size, description="TP size", style=style)
    batch_w = widgets.SelectionSlider(options=list(BATCH_SIZES), value=batch_size, description="batch", style=style)
    ctx_w = widgets.SelectionSlider(options=list(CONTEXT_LENS), value=context_len, description="context", style=style)
    out = widgets.HTML()

    def update(_change: object = None) -> None:
        shape, hw = MODEL_PRESETS[model_w.value], HARDWARE_PRESETS[hw_w.value]
        try:
            step = decode_step_time(shape, hw, tp_w.value, batch_w.value, ctx_w.value)
        except ValueError as err:
            out.value = f"<p><b>Not a valid setting:</b> {err}</p>"
            return
        out.value = step_table_html(shape, hw, step)

    for control in (model_w, hw_w, tp_w, batch_w, ctx_w):
        control.observe(update, names="value")
    update()
    return widgets.VBox([widgets.HBox([model_w, hw_w]), tp_w, batch_w, ctx_w, out])


def roofline_explorer(
    model: str = "llama-7b",
    hardware: str = "h100",
    tp_sizes: Sequence[int] = TP_SIZES,
    batch_sizes: Sequence[int] = (1, 8, 64, 256),
    context_len: int = 1024,
) -> ipywidgets.VBox:
    """Precomputed frames: a TP slider and a batch slider ``jslink``-ed to nested ``Stack`` widgets.

    Works without a kernel: moving a slider only changes which precomputed table is shown.
    """
    import ipywidgets as widgets

    shape, hw = MODEL_PRESETS[model], HARDWARE_PRESETS[hardware]
    style = {"description_width": "initial"}
    tp_w = widgets.SelectionSlider(options=[str(t) for t in tp_sizes], description="TP size", style=style)
    batch_w = widgets.SelectionSlider(options=[str(b) for b in batch_sizes], description="batch", style=style)
    frames = [[widgets.HTML(step_table_html(shape, hw, decode_step_time(shape, hw, t, b, context_len)))
               for b in batch_sizes] for t in tp_sizes]
    return widgets.VBox([tp_w, batch_w, linked_stacks([tp_w, batch_w], frames)])
