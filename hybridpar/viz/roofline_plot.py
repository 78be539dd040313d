"""Matplotlib figures for chapter 1: the roofline with decode steps on it, and step time versus TP size."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from hybridpar.roofline import DecodeStep, HardwareSpec, ModelShape, attainable_flops, decode_step_time

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot_roofline(hardware: HardwareSpec, points: Mapping[str, DecodeStep], ax: Axes | None = None) -> Axes:
    """Log-log roofline of ``hardware`` (attainable FLOP/s versus FLOP/byte), one marker per labelled step.

    A step sits at its arithmetic intensity; its height is the FLOP/s the roofline allows there.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 4))
    intensity = np.logspace(-1, 4, 200)
    ax.loglog(intensity, [attainable_flops(hardware, i) for i in intensity], color="black", lw=2,
              label=f"{hardware.name} roofline")
    ax.axvline(hardware.ridge_intensity, color="grey", ls=":", lw=1)
    ax.annotate(f"ridge {hardware.ridge_intensity:.0f} FLOP/B", (hardware.ridge_intensity, hardware.peak_flops / 30),
                rotation=90, ha="right", va="bottom", fontsize=8, color="grey")
    for label, step in points.items():
        x = step.arithmetic_intensity
        ax.plot([x], [attainable_flops(hardware, x)], "o", label=label)
    ax.set_xlabel("arithmetic intensity (FLOP / byte read)")
    ax.set_ylabel("attainable FLOP/s")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, which="major", alpha=0.3)
    return ax


def plot_step_time_vs_tp(
    model: ModelShape,
    hardware: HardwareSpec,
    tp_sizes: Sequence[int],
    batch_size: int,
    context_len: int,
    ax: Axes | None = None,
) -> Axes:
    """Stacked bars per TP size: the roofline part (max of memory and compute) and the communication on top."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.5))
    steps = [decode_step_time(model, hardware, t, batch_size, context_len) for t in tp_sizes]
    labels = [str(t) for t in tp_sizes]
    roof = [1e3 * max(s.memory_time, s.compute_time) for s in steps]
    comm = [1e3 * s.comm_time for s in steps]
    ax.bar(labels, roof, label="memory / compute (the larger)")
    ax.bar(labels, comm, bottom=roof, label="communication (all-reduce, gather)")
    ax.set_xlabel("TP size")
    ax.set_ylabel("decode step time (ms)")
    ax.set_title(f"{model.name} on {hardware.name}, batch {batch_size}, context {context_len}", fontsize=10)
    ax.legend(fontsize=8)
    return ax
