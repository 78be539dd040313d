"""Chapter 2's figure: algorithm and bus bandwidth of a measured collective sweep, against message size."""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from hybridpar.distributed.bandwidth import BandwidthResult, format_size

if TYPE_CHECKING:
    from matplotlib.axes import Axes


def plot_bandwidth(results: Sequence[BandwidthResult], ax: Axes | None = None, label: str = "") -> Axes:
    """Log-log algbw and busbw (GB/s) per message size; one sweep per call (call again on ``ax`` to compare)."""
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot; run hybridpar.distributed.bandwidth.all_reduce_sweep first")
    if ax is None:
        _, ax = plt.subplots(figsize=(6.5, 3.5))
    first = results[0]
    name = label or f"{first.collective}, {first.world_size} ranks, {first.backend}"
    sizes = [r.size_bytes for r in results]
    (line,) = ax.loglog(sizes, [r.busbw / 1e9 for r in results], "o-", label=f"{name}: bus bandwidth")
    ax.loglog(sizes, [r.algbw / 1e9 for r in results], "x--", color=line.get_color(), alpha=0.6,
              label=f"{name}: algorithm bandwidth")
    ax.set_xticks(sizes[:: max(1, len(sizes) // 6)], [format_size(s) for s in sizes[:: max(1, len(sizes) // 6)]])
    ax.set_xlabel("message size")
    ax.set_ylabel("GB/s")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    return ax
